"""LoKr: Low-rank Kronecker product (Yeh et al., LyCORIS, 2024, arXiv:2309.14859).

    ΔW = s · W1 ⊗ W2,    W1 ∈ R^{a×c},  W2 ∈ R^{b×d},  d_out = a·b,  d_in = c·d,  s = α / r

``d_out`` and ``d_in`` are each split into two factors (:func:`factorize`: the pair closest to a
square, or one factor equal to ``decompose_factor``); W1 is the small (a×c) matrix and W2 the
large (b×d) one. W2 is itself a rank-r product W2a W2b when r < max(b, d)/2 (else a full matrix),
and with ``decompose_both`` W1 is too (W1a W1b, when r < max(a, c)/2). For a convolution, W2
carries the kernel: (b, d, *k) in full, (b, d·Πk) as W2a W2b, or with ``effective_conv``
(kernel > 1) a CP product of a core T2 (r, r, *k) with W2a (r, b), W2b (r, d); W1 acts on
channels only (W1 ⊗ W2 with W1 broadcast over the kernel positions).

Initialisation (``init="default"``, as in Hugging Face PEFT): W1 (or W1a) is zero, the rest
Kaiming-uniform, so training starts from the base model; ``init="lycoris"`` zeroes W2 (or W2b)
instead, as the LyCORIS repository does.

This follows PEFT's LoKr (factorisation, parameter shapes, s = α/r even when W2 is full, rank and
module dropout): on identical weights the outputs agree (tests). Differences: GPT-2 ``Conv1D`` is
supported too; a Conv1d CP core is (r, r, k) rather than PEFT's (r, r, k, 1); and for a Conv1d
whose W2 is a full (b, d, k) tensor PEFT's ``torch.kron`` of a 2-D and a 3-D tensor interleaves the
factors across the wrong axes, while here ΔW = W1[:, :, None] ⊗ W2 as for Conv2d. Parameter names
drop PEFT's ``lokr_`` prefix (``w1``, ``w1_a``, ``w1_b``, ``w2``, ``w2_a``, ``w2_b``, ``t2``).
Mergeable: ``W ← W ± ΔW``.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from deltatune.config import AdapterConfig
from deltatune.core.layer import Adapter
from deltatune.core.targeting import pattern_value
from deltatune.methods.lycoris import FullDeltaAdapter, cp_kernel, kaiming_, supported, validate_rank_and_dropouts

Init = Literal["default", "lycoris"]


def factorize(dim: int, factor: int = -1) -> tuple[int, int]:
    """Split ``dim`` into ``(m, n)`` with ``m · n = dim``: the pair nearest a square, ``m <= n``.

    If ``factor`` divides ``dim`` the result is ``(factor, dim // factor)`` as given. Otherwise the
    smaller factor is the largest divisor reached, in increasing order, before it exceeds
    ``factor`` (no bound if ``factor`` is -1) or passes √dim. Same results as LyCORIS / PEFT.
    """
    if factor > 0 and dim % factor == 0:
        return factor, dim // factor
    bound = dim if factor <= 0 else factor
    m = 1
    for d in range(2, dim + 1):
        if dim % d:
            continue
        if d > bound:
            break
        m = d
        if d >= dim // d:
            break
    return min(m, dim // m), max(m, dim // m)


class Lokr(FullDeltaAdapter):
    """LoKr on ``nn.Linear``, GPT-2 ``Conv1D``, ``nn.Conv1d`` or ``nn.Conv2d``."""

    def __init__(self, base: nn.Module, rank: int = 8, alpha: float = 8.0, rank_dropout: float = 0.0,
                 module_dropout: float = 0.0, rescale_rank_dropout: bool = False, effective_conv: bool = False,
                 decompose_both: bool = False, decompose_factor: int = -1, init: Init = "default") -> None:
        super().__init__(base, rank_dropout, module_dropout, rescale=rescale_rank_dropout)
        self.rank, self.scaling = rank, alpha / rank
        (a, b), (c, d) = factorize(self.d_out, decompose_factor), factorize(self.d_in, decompose_factor)
        k = self.kernel
        self.full_w1 = not (decompose_both and rank < max(a, c) / 2)
        self.full_w2 = not rank < max(b, d) / 2
        self.cp = not self.full_w2 and effective_conv and any(x != 1 for x in k)
        new = lambda *shape: nn.Parameter(torch.empty(shape))  # noqa: E731
        if self.full_w1:
            self.w1 = new(a, c)
        else:
            self.w1_a, self.w1_b = new(a, rank), new(rank, c)
        if self.full_w2:
            self.w2 = new(b, d, *k)
        elif self.cp:
            self.t2, self.w2_a, self.w2_b = new(rank, rank, *k), new(rank, b), new(rank, d)
        else:
            self.w2_a, self.w2_b = new(b, rank), new(rank, d * self.kernel_numel)
        self._initialise(init)

    def _initialise(self, init: Init) -> None:
        # One zero factor makes ΔW = 0: W1's (PEFT's default) or W2's (LyCORIS's).
        w1 = [self.w1] if self.full_w1 else [self.w1_a, self.w1_b]
        w2 = [self.w2] if self.full_w2 else [self.w2_a, self.w2_b]
        zero = w1[0] if init == "default" else w2[-1]
        kaiming_(*[p for p in [*w1, *w2, *([self.t2] if self.cp else [])] if p is not zero])
        nn.init.zeros_(zero)

    def extra_repr(self) -> str:
        return (f"d_in={self.d_in}, d_out={self.d_out}, kernel={self.kernel}, rank={self.rank}, "
                f"scaling={self.scaling:g}, full_w1={self.full_w1}, full_w2={self.full_w2}, effective_conv={self.cp}")

    def make_delta(self) -> Tensor:
        w1 = self.w1 if self.full_w1 else self.w1_a @ self.w1_b               # (a, c)
        if self.full_w2:
            w2 = self.w2                                                       # (b, d, *k)
        elif self.cp:
            w2 = cp_kernel(self.t2, self.w2_a, self.w2_b)                      # (b, d, *k)
        else:
            w2 = self.w2_a @ self.w2_b                                         # (b, d·Πk)
        w1 = w1.view(*w1.shape, *([1] * (w2.dim() - 2)))                       # broadcast over kernel
        return (torch.kron(w1, w2) * self.scaling).view(self.d_out, self.d_in, *self.kernel)


@dataclasses.dataclass(frozen=True)
class LokrConfig(AdapterConfig):
    """LoKr hyperparameters (PEFT's names in brackets).

    Attributes:
        rank: r [r], the rank of the decomposed Kronecker factors.
        alpha: α [alpha]; ΔW is scaled by α/r.
        rank_dropout: probability of dropping each output row of ΔW in training [rank_dropout].
        rescale_rank_dropout: divide by the kept share of rows [rank_dropout_scale].
        module_dropout: probability of skipping the adapter for a training batch [module_dropout].
        effective_conv: CP-decomposed W2 for convolutions with kernel > 1 [use_effective_conv2d].
        decompose_both: also write W1 as a rank-r product when r is small [decompose_both].
        decompose_factor: the factor to split dimensions by, -1 for the most square split [decompose_factor].
        init: ``default`` (W1 = 0, PEFT) or ``lycoris`` (W2 = 0) [init_weights].
        rank_pattern / alpha_pattern: per-module overrides, ``{pattern: value}``; the first
            matching pattern wins (same syntax as ``target``).
    """

    method: ClassVar[str] = "lokr"
    family: ClassVar[str] = "reparameterization"
    suggested_lr: ClassVar[float | None] = 1e-2  # Kronecker products of small factors
    search_space: ClassVar[dict[str, tuple]] = {"rank": (8, 4, 16)}  # plan / tune / compare --grid

    rank: int = 8
    alpha: float = 8.0
    rank_dropout: float = 0.0
    rescale_rank_dropout: bool = False
    module_dropout: float = 0.0
    effective_conv: bool = False
    decompose_both: bool = False
    decompose_factor: int = -1
    init: Init = "default"
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)

    def __hash__(self) -> int:  # dict fields: hash by identity, configs are compared by value
        return id(self)

    def validate(self) -> None:
        validate_rank_and_dropouts(self, "LoKr")
        if self.decompose_factor != -1 and self.decompose_factor < 1:
            raise ValueError(f"LoKr decompose_factor must be -1 (most square split) or >= 1, "
                             f"got {self.decompose_factor}")
        if self.init not in ("default", "lycoris"):
            raise ValueError(f"LoKr init must be 'default' or 'lycoris', got {self.init!r}")

    def build(self, name: str, base: nn.Module) -> Adapter | None:
        if supported(base) is None:
            return None
        rank = pattern_value(name, self.rank_pattern, self.rank)
        alpha = pattern_value(name, self.alpha_pattern, self.alpha)
        return Lokr(base, rank=rank, alpha=alpha, rank_dropout=self.rank_dropout, module_dropout=self.module_dropout,
                    rescale_rank_dropout=self.rescale_rank_dropout, effective_conv=self.effective_conv,
                    decompose_both=self.decompose_both, decompose_factor=self.decompose_factor, init=self.init)
