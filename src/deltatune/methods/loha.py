"""LoHa: Low-rank Hadamard product (Hyeon-Woo et al., FedPara, 2022, arXiv:2108.06098; LyCORIS).

    ΔW = s · (W1a W1b) ⊙ (W2a W2b),    W1a, W2a ∈ R^{d_out×r},  W1b, W2b ∈ R^{r×d_in},  s = α / r

The Hadamard product of two rank-r matrices can reach rank r², so LoHa expresses a richer update
than LoRA with the same 2r(d_in + d_out) parameters. W1a, W1b, W2a are Kaiming-uniform and W2b is
zero, so training starts from the base model. For a convolution, ΔW is the (C_out, C_in·Πk) matrix
reshaped to the kernel; with ``effective_conv`` (FedPara Proposition 3, kernels larger than 1)
each factor is instead a CP product of a small core T (r, r, *k) with W_a (r, C_out), W_b (r, C_in):

    ΔW[o, i, *k] = s · (Σ_pq T1[p,q,*k] W1a[p,o] W1b[q,i]) · (Σ_pq T2[p,q,*k] W2a[p,o] W2b[q,i])

This follows Hugging Face PEFT's LoHa (parameter shapes, initialisation, s = α/r, rank and module
dropout): on identical weights the outputs agree (tests). Differences: GPT-2 ``Conv1D`` layers
are supported too (PEFT's LoHa does not), and a Conv1d CP core is (r, r, k) rather than PEFT's
(r, r, k, 1). With ``effective_conv``, PEFT's hand-written backward (``HadaWeightCP``, taken from
LyCORIS) builds the gradients of W1a and W2a from the other factor's core; here autograd
differentiates the formula (checked by gradcheck), so those two gradients differ from PEFT's while
outputs and all other gradients agree. Parameter names drop PEFT's ``hada_`` prefix: ``w1_a``,
``w1_b``, ``w2_a``, ``w2_b``, ``t1``, ``t2``. Mergeable: ``W ← W ± ΔW``.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import Tensor, nn

from deltatune.config import AdapterConfig
from deltatune.core.layer import Adapter
from deltatune.core.targeting import pattern_value
from deltatune.methods.lycoris import FullDeltaAdapter, cp_kernel, kaiming_, supported, validate_rank_and_dropouts


class Loha(FullDeltaAdapter):
    """LoHa on ``nn.Linear``, GPT-2 ``Conv1D``, ``nn.Conv1d`` or ``nn.Conv2d``."""

    def __init__(self, base: nn.Module, rank: int = 8, alpha: float = 8.0, rank_dropout: float = 0.0,
                 module_dropout: float = 0.0, effective_conv: bool = False) -> None:
        super().__init__(base, rank_dropout, module_dropout, rescale=True)
        self.rank, self.scaling = rank, alpha / rank
        d_out, d_in, kernel = self.d_out, self.d_in, self.kernel
        self.cp = effective_conv and any(k != 1 for k in kernel)
        if self.cp:
            self.t1 = nn.Parameter(torch.empty(rank, rank, *kernel))  # (r, r, *k)
            self.t2 = nn.Parameter(torch.empty(rank, rank, *kernel))
            shape_a, shape_b = (rank, d_out), (rank, d_in)
        else:
            shape_a, shape_b = (d_out, rank), (rank, d_in * self.kernel_numel)
        self.w1_a = nn.Parameter(torch.empty(shape_a))
        self.w1_b = nn.Parameter(torch.empty(shape_b))
        self.w2_a = nn.Parameter(torch.empty(shape_a))
        self.w2_b = nn.Parameter(torch.zeros(shape_b))  # zero: ΔW = 0 at the start
        kaiming_(self.w1_a, self.w1_b, self.w2_a, *([self.t1, self.t2] if self.cp else []))

    def extra_repr(self) -> str:
        return (f"d_in={self.d_in}, d_out={self.d_out}, kernel={self.kernel}, rank={self.rank}, "
                f"scaling={self.scaling:g}, effective_conv={self.cp}")

    def make_delta(self) -> Tensor:
        if self.cp:
            return cp_kernel(self.t1, self.w1_a, self.w1_b) * cp_kernel(self.t2, self.w2_a, self.w2_b) * self.scaling
        delta = ((self.w1_a @ self.w1_b) * (self.w2_a @ self.w2_b)) * self.scaling  # (d_out, d_in·Πk)
        return delta.view(self.d_out, self.d_in, *self.kernel)


@dataclasses.dataclass(frozen=True)
class LohaConfig(AdapterConfig):
    """LoHa hyperparameters (PEFT's names in brackets).

    Attributes:
        rank: r [r], the rank of each of the two factors.
        alpha: α [alpha]; ΔW is scaled by α/r.
        rank_dropout: probability of dropping each output row of ΔW in training [rank_dropout].
        module_dropout: probability of skipping the adapter for a training batch [module_dropout].
        effective_conv: CP-decomposed kernels for convolutions with kernel > 1 [use_effective_conv2d].
        rank_pattern / alpha_pattern: per-module overrides, ``{pattern: value}``; the first
            matching pattern wins (same syntax as ``target``).
    """

    method: ClassVar[str] = "loha"
    family: ClassVar[str] = "reparameterization"
    suggested_lr: ClassVar[float | None] = 5e-3  # Hadamard products of small factors
    search_space: ClassVar[dict[str, tuple]] = {"rank": (8, 4, 16)}  # plan / tune / compare --grid

    rank: int = 8
    alpha: float = 8.0
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    effective_conv: bool = False
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)

    def __hash__(self) -> int:  # dict fields: hash by identity, configs are compared by value
        return id(self)

    def validate(self) -> None:
        validate_rank_and_dropouts(self, "LoHa")

    def update_rank(self, name: str) -> int | None:
        return pattern_value(name, self.rank_pattern, self.rank)

    def build(self, name: str, base: nn.Module) -> Adapter | None:
        if supported(base) is None:
            return None
        rank = pattern_value(name, self.rank_pattern, self.rank)
        alpha = pattern_value(name, self.alpha_pattern, self.alpha)
        return Loha(base, rank=rank, alpha=alpha, rank_dropout=self.rank_dropout,
                    module_dropout=self.module_dropout, effective_conv=self.effective_conv)
