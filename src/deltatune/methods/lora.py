"""LoRA: Low-Rank Adaptation of Large Language Models (Hu et al., 2021, arXiv:2106.09685).

    h = W x + s · B A x,    A ∈ R^{r×d_in},  B ∈ R^{d_out×r},  s = α / r

with ``s = α / √r`` for rsLoRA (Kalajdzievski, 2023, arXiv:2312.03732). A is initialised with
Kaiming-uniform and B with zeros, so training starts from the base model. Other initialisations:

- ``gaussian``: A ~ N(0, 1/r), B = 0;
- ``pissa`` (Meng et al., 2024, arXiv:2404.02948): s·B A = U_r S_r V_rᵀ, the top-r singular part of W;
- ``olora`` (Büyükakyüz, 2024, arXiv:2406.01775): B = Q_r, A = R_r from the QR decomposition of W.

PiSSA and OLoRA start from a non-zero B A. Hugging Face PEFT subtracts it from the base weight,
which changes the base and ties the adapter to that modified copy. Here the base stays
bit-identical: the adapter keeps the initial factors A₀, B₀ as frozen buffers and computes
``W x + s·(B A − B₀ A₀) x``. Gradients, and so training, are exactly those of PiSSA/OLoRA; the saved
adapter applies to the original base; merging adds ``s·(B A − B₀ A₀)``.

Supported layers: ``nn.Linear``, transformers' GPT-2 ``Conv1D`` (weight stored transposed),
``nn.Conv1d`` / ``nn.Conv2d`` (A is a convolution with the base kernel, B a 1×1 convolution; grouped
and depthwise convolutions get one update per group, see :class:`LoraConv`) and
``nn.Embedding`` (A is looked up by token id; following PEFT, A starts at zero and B is Gaussian)
and ``nn.EmbeddingBag`` in ``sum`` / ``mean`` mode (the bag of A's columns, then B: a bag is linear in
its table, so ``bag(E + s·(BA)ᵀ) = bag(E) + s·bag(Aᵀ) Bᵀ``; PEFT has no LoRA for bags).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deltatune.config import AdapterConfig
from deltatune.core.layer import Adapter
from deltatune.core.layers import bag_like, base_weight, dequantized_weight_fn, describe, is_transposed_linear, linear_bag
from deltatune.core.targeting import pattern_value
from deltatune.core.products import runs_like_its_weight
from deltatune.methods.lora_kernels import dropout_mask, lora_linear

Init = Literal["default", "gaussian", "pissa", "olora"]
#: The attention query and value projections of BERT- and Llama-style models (Hu et al. adapt W_q, W_v).
ATTENTION_QV = ("attention.self.query", "attention.self.value", "q_proj", "v_proj")


def lora_scaling(rank: int, alpha: float, rslora: bool) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


class LoraLinear(Adapter):
    """LoRA on a linear layer: ``base(x) + s · B A drop(x)``. ``transposed`` for GPT-2 ``Conv1D``."""

    def __init__(self, d_in: int, d_out: int, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                 rslora: bool = False, transposed: bool = False) -> None:
        super().__init__()
        self.rank, self.scaling, self.transposed = rank, lora_scaling(rank, alpha, rslora), transposed
        self.A = nn.Parameter(torch.empty(rank, d_in))   # (r, d_in)
        self.B = nn.Parameter(torch.zeros(d_out, rank))  # (d_out, r)
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def extra_repr(self) -> str:
        d_out, r = self.B.shape
        return f"d_in={self.A.shape[1]}, d_out={d_out}, rank={r}, scaling={self.scaling:g}"

    def reference(self, A0: Tensor, B0: Tensor) -> None:
        """Start from factors A₀, B₀ (PiSSA/OLoRA) while leaving the base output unchanged."""
        with torch.no_grad():
            self.A.copy_(A0)
            self.B.copy_(B0)
        self.register_buffer("A0", A0.detach().clone())
        self.register_buffer("B0", B0.detach().clone())

    def _factors(self) -> tuple[Tensor, Tensor]:
        # With reference factors the update is [B, -B₀] [A; A₀]: one rank-2r product.
        if hasattr(self, "A0"):
            return torch.cat([self.A, self.A0]), torch.cat([self.B, -self.B0], dim=1)
        return self.A, self.B

    def forward(self, x: Tensor, base: Any) -> Tensor:
        A, B = self._factors()
        weight: Tensor | Callable[[], Tensor] | None = None
        if self._fusable(base):
            weight = base.weight.t() if self.transposed else base.weight  # (d_out, d_in)
        elif not self.transposed and not torch.compiler.is_compiling():
            # a quantized base (NF4): dequantized inside the fused node, in forward and in backward
            weight = dequantized_weight_fn(base, x)
        if weight is not None:
            # One fused autograd node (methods/lora_kernels.py); the base layer runs inside it.
            p = self.dropout.p if isinstance(self.dropout, nn.Dropout) else 0.0
            mask = dropout_mask(x, p) if self.training and p > 0 else None
            return lora_linear(x, weight, base.bias, A, B, self.scaling, mask, 1.0 - p)
        h = base(x)
        return h + F.linear(F.linear(self.dropout(x), A.to(x.dtype)), B.to(x.dtype)) * self.scaling

    def _fusable(self, base: Any) -> bool:
        """The fused path computes the base layer itself: only for a plain, frozen Linear/Conv1D
        called directly, without hooks (stacked adapters, subclasses with their own forward and
        layers with hooks, e.g. accelerate's offloading, use the formula and call ``base``)."""
        if not runs_like_its_weight(base):
            return False
        return is_transposed_linear(base) if self.transposed else type(base).forward is nn.Linear.forward

    def delta_weight(self, base: nn.Module) -> Tensor:
        A, B = self._factors()
        delta = (B @ A) * self.scaling  # (d_out, d_in)
        return delta.t() if self.transposed else delta

    # Low-rank capability (core/routing.py): batched mixed-adapter batches, hot swap, combination.
    def low_rank_factors(self) -> tuple[Tensor, Tensor, float]:
        """``(A (k, d_in), B (d_out, k), s)`` with ``forward(x, base) = base(x) + s·(drop(x) Aᵀ) Bᵀ``."""
        A, B = self._factors()
        return A, B, self.scaling

    @torch.no_grad()
    def load_low_rank(self, A: Tensor, B: Tensor, scaling: float) -> None:
        """Make the update ``scaling · B A`` in place; a smaller rank is zero-padded, ``self.scaling`` kept."""
        k, rank = A.shape[0], self.A.shape[0]
        if k > rank or self.scaling == 0:
            raise ValueError(f"cannot load a rank-{k} update into this rank-{rank} LoRA; attach one with rank >= {k}")
        self.A.zero_()[:k].copy_(A)
        self.B.zero_()[:, :k].copy_(B * (scaling / self.scaling))
        if hasattr(self, "A0"):  # the reference factors would otherwise still be subtracted
            self.A0.zero_()
            self.B0.zero_()


class LoraEmbedding(Adapter):
    """LoRA on an embedding table: ``base(ids) + s · (A[:, ids])ᵀ Bᵀ``."""

    def __init__(self, num_embeddings: int, dim: int, rank: int = 8, alpha: float = 16.0,
                 rslora: bool = False, padding_idx: int | None = None) -> None:
        super().__init__()
        self.rank, self.scaling, self.padding_idx = rank, lora_scaling(rank, alpha, rslora), padding_idx
        self.A = nn.Parameter(torch.zeros(rank, num_embeddings))  # (r, V)
        self.B = nn.Parameter(torch.empty(dim, rank))             # (d, r)
        nn.init.normal_(self.B)

    def forward(self, x: Tensor, base: Any) -> Tensor:
        h = base(x)                                          # (..., d)
        after_a = F.embedding(x, self.A.t(), padding_idx=self.padding_idx)  # (..., r)
        return h + (after_a @ self.B.t()) * self.scaling

    def delta_weight(self, base: nn.Module) -> Tensor:
        return (self.B @ self.A).t() * self.scaling          # (V, d)


class LoraEmbeddingBag(LoraEmbedding):
    """LoRA on an ``nn.EmbeddingBag`` (sum or mean): ``base(ids, offsets) + s · bag(Aᵀ)[ids] Bᵀ``, the
    base's own reduction (offsets, per-sample weights, padding) over Aᵀ (V, r), then B."""

    def forward(self, x: Tensor, base: Any) -> Tensor:
        h = base(x)                                          # (bags, d)
        after_a = bag_like(base, self.A.t().to(h.dtype), x)  # (bags, r)
        return h + (after_a @ self.B.t().to(h.dtype)) * self.scaling


class LoraConv(Adapter):
    """LoRA on ``nn.Conv1d``/``nn.Conv2d``: A convolves like the base, B mixes channels (1×1).

    A grouped convolution (``groups = g``, depthwise when g = C_in) is g independent convolutions;
    each group gets its own rank-r update, so A is a grouped convolution with r·g outputs and B a
    grouped 1×1 convolution, and per group ``ΔW_j = s · B_j A_j``: still an exact merge. For g > 1,
    r is capped at the rank a group's update can have, ``min(C_out/g, C_in/g · Πk)`` (1 for a
    depthwise 3×3), and the scaling stays α / r of the rank asked for.
    """

    def __init__(self, conv: nn.Conv1d | nn.Conv2d, rank: int = 8, alpha: float = 16.0,
                 dropout: float = 0.0, rslora: bool = False) -> None:
        super().__init__()
        if conv.padding_mode != "zeros":
            raise ValueError("LoRA supports convolutions with padding_mode='zeros'")
        g = conv.groups
        per_in, per_out = conv.in_channels // g, conv.out_channels // g
        self.scaling = lora_scaling(rank, alpha, rslora)  # α/r with the rank asked for, as PEFT scales it
        self.rank = min(rank, per_out, per_in * math.prod(conv.kernel_size)) if g > 1 else rank
        self.groups = g
        self.conv = F.conv1d if len(conv.kernel_size) == 1 else F.conv2d
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        ones = (1,) * len(conv.kernel_size)
        self.A = nn.Parameter(torch.empty(self.rank * g, per_in, *conv.kernel_size))  # (g·r, C_in/g, *k)
        self.B = nn.Parameter(torch.zeros(conv.out_channels, self.rank, *ones))        # (C_out, r, *1)
        for a in self.A.view(g, self.rank, *self.A.shape[1:]):  # each group as a groups=1 LoRA would be
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def extra_repr(self) -> str:
        return f"rank={self.rank}, groups={self.groups}, scaling={self.scaling:g}"

    def forward(self, x: Tensor, base: Any) -> Tensor:
        if self.groups > 1:
            # A group's update is tiny ((C_out/g, C_in/g, *k)): convolve once with ΔW (from the
            # factors, so gradients reach A and B) instead of running two grouped convolutions,
            # which are slow on CPU; with a plain frozen base, with W + ΔW in one convolution.
            delta = self.delta_weight(base).to(x.dtype)                  # (C_out, C_in/g, *k)
            if not self.training or isinstance(self.dropout, nn.Identity):
                if runs_like_its_weight(base) and type(base).forward in (nn.Conv1d.forward, nn.Conv2d.forward):
                    return base._conv_forward(x, base.weight + delta, base.bias)
            z = self.dropout(x)
            return base(x) + self.conv(z, delta, None, self.stride, self.padding, self.dilation, self.groups)
        A, B = self.A.to(x.dtype), self.B.to(x.dtype)
        z = self.conv(self.dropout(x), A, None, self.stride, self.padding, self.dilation)  # (N, r, *L)
        return base(x) + self.conv(z, B) * self.scaling                                   # (N, C_out, *L)

    def delta_weight(self, base: nn.Module) -> Tensor:
        # Per group j: ΔW_j[o, i, *k] = s · Σ_r B_j[o, r] A_j[r, i, *k]
        g, r = self.groups, self.rank
        B = self.B.flatten(1).view(g, -1, r)                  # (g, C_out/g, r)
        A = self.A.flatten(1).view(g, r, -1)                  # (g, r, C_in/g · Πk)
        flat = torch.bmm(B, A).reshape(self.B.shape[0], -1)   # (C_out, C_in/g · Πk)
        return flat.view(self.B.shape[0], *self.A.shape[1:]) * self.scaling


@dataclasses.dataclass(frozen=True)
class LoraConfig(AdapterConfig):
    """LoRA hyperparameters.

    Attributes:
        rank: r, the rank of the update.
        alpha: α; the update is scaled by α/r (α/√r with ``rslora``).
        dropout: dropout on the adapter's input (Linear and Conv only).
        rslora: rank-stabilised scaling α/√r.
        init: ``default`` | ``gaussian`` | ``pissa`` | ``olora``.
        rank_pattern / alpha_pattern: per-module overrides, ``{pattern: value}``; the first
            matching pattern wins (same syntax as ``target``).
    """

    method: ClassVar[str] = "lora"
    family: ClassVar[str] = "reparameterization"
    # plan / tune / compare --grid: the rank and where the update goes (every linear layer, or Q and V)
    search_space: ClassVar[dict[str, Any]] = {"rank": (8, 4, 16),
                                              "target": {"all-linear": "all-linear", "attention-qv": ATTENTION_QV}}

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False
    init: Init = "default"
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)

    def __hash__(self) -> int:  # dict fields: hash by identity, configs are compared by value
        return id(self)

    def low_rank_config(self, rank: int) -> LoraConfig:
        """A plain rank-``rank`` LoRA (scaling 1) on the same kind of layers: the home of a combination."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(LoraConfig)}  # subclasses -> LoRA
        return LoraConfig(**{**fields, "rank": rank, "alpha": float(rank), "rslora": False, "init": "default",
                             "rank_pattern": {}, "alpha_pattern": {}})

    def validate(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        for pattern, rank in self.rank_pattern.items():
            if rank < 1:
                raise ValueError(f"LoRA rank must be >= 1, got rank_pattern[{pattern!r}] = {rank}")
        if self.alpha == 0 or any(a == 0 for a in self.alpha_pattern.values()):
            raise ValueError("LoRA alpha must not be 0: the update alpha/rank * B A would always be zero "
                             "(a common choice is alpha = 2 * rank)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if self.init not in ("default", "gaussian", "pissa", "olora"):
            raise ValueError(f"LoRA init must be one of default, gaussian, pissa, olora; got {self.init!r}")

    def update_rank(self, name: str) -> int | None:
        return pattern_value(name, self.rank_pattern, self.rank)

    def build(self, name: str, base: nn.Module) -> Adapter | None:
        rank = pattern_value(name, self.rank_pattern, self.rank)
        alpha = pattern_value(name, self.alpha_pattern, self.alpha)
        kw = dict(rank=rank, alpha=alpha, rslora=self.rslora)
        spec = describe(base)
        if self.init in ("pissa", "olora") and (spec is None or spec.kind != "linear"):
            raise ValueError(f"init {self.init!r} supports Linear layers only; {name!r} is a {type(base).__name__}")
        if spec is None:
            return None
        if spec.kind == "linear":
            adapter: Adapter = LoraLinear(spec.d_in, spec.d_out, dropout=self.dropout, transposed=spec.transposed, **kw)
        elif spec.kind == "embedding":
            adapter = LoraEmbedding(spec.d_in, spec.d_out, padding_idx=base.padding_idx, **kw)
        elif spec.kind == "embedding_bag":
            why = linear_bag(base)
            if why:
                raise ValueError(f"LoRA cannot adapt {name!r}: {why}")
            adapter = LoraEmbeddingBag(spec.d_in, spec.d_out, padding_idx=base.padding_idx, **kw)
        elif spec.kind == "conv" and not spec.transposed and spec.spatial in (1, 2):
            adapter = LoraConv(base, dropout=self.dropout, **kw)
        else:
            return None
        self._initialise(adapter, base)
        return adapter

    def _initialise(self, adapter: Adapter, base: nn.Module) -> None:
        if self.init == "gaussian" and not isinstance(adapter, LoraEmbedding):
            with torch.no_grad():
                adapter.A.normal_(0.0, 1.0 / adapter.rank)
        elif self.init in ("pissa", "olora"):
            assert isinstance(adapter, LoraLinear)
            weight = base_weight(base).detach().to(torch.float32)  # dequantized for a quantized base
            weight = weight.t() if adapter.transposed else weight  # (d_out, d_in)
            r, s = adapter.rank, adapter.scaling
            if self.init == "pissa":
                U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
                root = torch.sqrt(S[:r] / s)
                A0, B0 = root[:, None] * Vh[:r], U[:, :r] * root[None, :]
            else:
                Q, R = torch.linalg.qr(weight)
                A0, B0 = R[:r], Q[:, :r]  # as in PEFT: the update starts at s·Q_r R_r
            adapter.reference(A0.to(adapter.A.dtype), B0.to(adapter.B.dtype))
