"""DoRA: Weight-Decomposed Low-Rank Adaptation (Liu et al., 2024, arXiv:2402.09353).

    W' = m · V / ‖V‖_c,    V = W + s · B A

The weight is split into a magnitude vector m (one entry per output unit, initialised to ‖W‖_c)
and a direction V, which LoRA updates (A, B, s = α/r, as in :mod:`deltatune.methods.lora`).
‖·‖_c is the norm of each output unit's weights, as Hugging Face PEFT defines it: the rows of a
Linear weight (d_out, d_in), each output channel of a convolution over (C_in, *k), and for an
Embedding (V, d) each embedding dimension over the vocabulary. As the paper suggests (§4.3) and
PEFT does, ‖V‖_c is treated as a constant in the gradient. With b the base bias, the forward is

    h = m / ‖V‖_c ⊙ (W x + s · B A drop(x)) + b

computed as ``scale ⊙ lora(x) + (1 − scale) ⊙ b`` where ``lora(x) = W x + b + s·B A drop(x)`` is
LoRA's forward: W' is never formed, the base product is computed once, and at initialisation
(scale = 1 exactly) the output is bit-identical to the base's. For linear layers this runs as one
fused autograd function (:mod:`deltatune.methods.dora_kernels`) that avoids (N, d_out) temporaries
in backward; convolutions and embeddings compose LoRA's forward with the rescale.

‖V‖_c is computed without forming V, row by row:

    ‖V_i‖² = ‖W_i‖² + 2s · Σ_k B_ik (W Aᵀ)_ik + s² · Σ_k (B AAᵀ)_ik B_ik

The dominant cost is one (d_out × d_in) @ (d_in × r) product; ‖W_i‖² and the norm itself are
cached and recomputed only when W, A or B change (tensor version counters), so evaluation after
the first batch pays nothing, and a training step pays once per optimizer step. (In float32 the
expansion loses precision only when ‖V_i‖ is far smaller than ‖W_i‖, i.e. when B A nearly cancels W.)

Differences from PEFT (outputs agree wherever both define them; tests check this):

- with dropout in training, PEFT computes ``W x + b + (m/‖V‖ − 1)·W drop(x) + m/‖V‖·s·B A drop(x)``;
  here dropout applies to the low-rank path only, as in LoRA (formula above). Same without dropout
  and in eval mode;
- the magnitude is a flat (d_out,) vector for every layer type (PEFT: (1, C_out, 1, 1) for Conv2d);
  its saved key is ``magnitude`` and the LoRA factors are ``lora.A`` / ``lora.B``.

Merging writes ``W ← scale ⊙ (W + s·B A)`` and keeps the scale used, so unmerging divides by the
same numbers (``W ← W / scale − s·B A``) instead of re-deriving the norm from the merged weight.
Supported layers: those LoRA supports (Linear, GPT-2 ``Conv1D``, Conv1d/Conv2d, Embedding); the
LoRA initialisations (``gaussian``, ``pissa``, ``olora``) carry over.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from deltatune.core.layer import Adapter
from deltatune.core.layers import base_weight, describe
from deltatune.methods.dora_kernels import dora_linear
from deltatune.methods.lora import LoraConfig, LoraConv, LoraEmbedding, LoraLinear


def _key(*tensors: Tensor) -> tuple:
    # Identifies the values of tensors: storage, in-place version (bumped by optimizer steps,
    # load_state_dict and merges), dtype, and the grad mode they were read in.
    return (*((t.data_ptr(), t._version, t.dtype) for t in tensors), torch.is_inference_mode_enabled())


class Dora(Adapter):
    """DoRA around a LoRA adapter ``lora``; ``weight`` (the frozen base weight) sets m = ‖W‖_c.

    Subclasses say how the base weight and the factors read as matrices (``_matrices``) and how
    the per-output scale broadcasts over outputs and over the weight.
    """

    merge_atol: ClassVar[float] = 1e-5

    def __init__(self, lora: Adapter, weight: Tensor) -> None:
        super().__init__()
        self.lora = lora
        self._norm_cache: tuple[tuple, Tensor] | None = None
        self._sq_cache: tuple[tuple, Tensor] | None = None
        self._merged_scale: Tensor | None = None
        self.magnitude = nn.Parameter(self.direction_norm(weight).to(weight.dtype))  # (d_out,)

    # --- layout, per layer type ---------------------------------------------------------------

    def _matrices(self, weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """W (d_out, d_in), A (r, d_in), B (d_out, r), so that V = W + s·B A."""
        raise NotImplementedError

    def _out_shape(self, weight: Tensor) -> tuple[int, ...]:
        return (-1,)  # output units on the last dim

    def _weight_shape(self, weight: Tensor) -> tuple[int, ...]:
        return (-1, 1)

    # --- the norm ‖W + s·B A‖_c, without forming W + s·B A -------------------------------------

    @torch.no_grad()
    def direction_norm(self, weight: Tensor) -> Tensor:
        """‖W + s·B A‖_c, (d_out,), in at least float32; cached until W, A or B change."""
        if torch.compiler.is_compiling():
            return self._compute_norm(weight)
        key = _key(weight, self.lora.A, self.lora.B)
        if self._norm_cache is None or self._norm_cache[0] != key:
            self._norm_cache = (key, self._compute_norm(weight))
        return self._norm_cache[1]

    def _compute_norm(self, weight: Tensor) -> Tensor:
        W, A, B = self._matrices(weight)
        dtype = torch.promote_types(weight.dtype, torch.float32)
        W, A, B = W.to(dtype), A.to(W.device, dtype), B.to(W.device, dtype)
        s = self.lora.scaling
        cross = ((W @ A.t()) * B).sum(1)                # (d_out,): Σ_j W_ij (s·BA)_ij / s
        low = ((B @ (A @ A.t())) * B).sum(1)            # (d_out,): ‖(BA)_i‖²
        sq = self._squared_rows(weight, W)              # (d_out,): ‖W_i‖²
        norm = (sq + (2 * s) * cross + (s * s) * low).clamp_min_(0).sqrt_()
        # A zero row of V has m = 0 too: keep m/‖V‖ finite (0) there instead of NaN.
        return norm.clamp_min_(torch.finfo(dtype).tiny)

    def _squared_rows(self, weight: Tensor, W: Tensor) -> Tensor:
        # ‖W_i‖² depends on the frozen weight only: computed once, reused until W changes (a merge).
        if torch.compiler.is_compiling():
            return torch.linalg.vector_norm(W, dim=1).square_()
        key = _key(weight)
        if self._sq_cache is None or self._sq_cache[0] != key:
            self._sq_cache = (key, torch.linalg.vector_norm(W, dim=1).square_())
        return self._sq_cache[1]

    def scale(self, weight: Tensor) -> Tensor:
        """m / ‖W + s·B A‖_c, (d_out,); gradients reach m only (the norm is a constant)."""
        norm = self.direction_norm(weight)
        return self.magnitude / norm.to(self.magnitude.dtype)

    # --- forward and merge --------------------------------------------------------------------

    def forward(self, x: Tensor, base: Any) -> Tensor:
        u = self.lora(x, base)                           # W x + b + s·B A drop(x)
        weight = base_weight(base)                       # dequantized on the fly for a quantized base
        scale = self.scale(weight).to(u.dtype).view(self._out_shape(weight))
        bias = getattr(base, "bias", None)
        if bias is None:
            return u * scale
        # scale ⊙ (u − b) + b, without an (N, d_out) subtraction: the bias term is (d_out,) only.
        return torch.addcmul(bias.to(u.dtype).view(scale.shape) * (1 - scale), u, scale)

    def delta_weight(self, base: nn.Module) -> Tensor:
        """W' − W for the (unmerged) base weight W, in its layout."""
        weight = base_weight(base)
        scale = self.scale(weight).view(self._weight_shape(weight))
        return scale * (weight + self.lora.delta_weight(base)) - weight

    @torch.no_grad()
    def merge_into(self, base: nn.Module) -> None:
        weight = base.weight
        dtype = torch.promote_types(weight.dtype, torch.float32)
        scale = (self.magnitude.to(dtype) / self.direction_norm(weight)).view(self._weight_shape(weight))
        weight.copy_((weight.to(dtype) + self.lora.delta_weight(base).to(dtype)) * scale)
        self._merged_scale = scale  # unmerge divides by exactly these numbers

    @torch.no_grad()
    def unmerge_from(self, base: nn.Module) -> None:
        if self._merged_scale is None:
            raise RuntimeError("this DoRA adapter is not merged; nothing to unmerge")
        weight, scale = base.weight, self._merged_scale
        weight.copy_(weight.to(scale.dtype) / scale - self.lora.delta_weight(base).to(scale.dtype))
        self._merged_scale = None


class DoraLinear(Dora):
    """DoRA on ``nn.Linear`` or GPT-2 ``Conv1D`` (weight stored (d_in, d_out))."""

    lora: LoraLinear

    def _matrices(self, weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        A, B = self.lora._factors()  # with PiSSA/OLoRA reference factors: [A; A₀], [B, −B₀]
        return (weight.t() if self.lora.transposed else weight), A, B

    def _weight_shape(self, weight: Tensor) -> tuple[int, ...]:
        return (1, -1) if self.lora.transposed else (-1, 1)

    def forward(self, x: Tensor, base: Any) -> Tensor:
        # The fused kernel needs the frozen module itself (not stacked adapters).
        if (not isinstance(base, nn.Module) or not base.weight.is_floating_point() or base.weight.requires_grad
                or describe(base).quantized):
            return super().forward(x, base)
        lora = self.lora
        A, B = lora._factors()
        weight = base.weight.t() if lora.transposed else base.weight  # (d_out, d_in)
        dropout = lora.dropout
        xd = dropout(x) if self.training and isinstance(dropout, nn.Dropout) else None
        device = x.device.type
        if not torch.is_autocast_enabled(device):
            return dora_linear(x, weight, base.bias, A, B, lora.scaling, self.scale(base.weight).to(x.dtype), xd)
        # Under autocast: the kernel runs in the autocast dtype, as autocast would run the products;
        # the casts are autograd ops, so A, B and m get their gradients in their own dtype. The norm
        # (and with it the scale) is taken in float32, outside autocast.
        low = torch.get_autocast_dtype(device)
        with torch.autocast(device, enabled=False):
            scale = self.scale(base.weight)
            bias = None if base.bias is None else base.bias.to(low)
            return dora_linear(x.to(low), weight.to(low), bias, A.to(low), B.to(low), lora.scaling, scale.to(low),
                               None if xd is None else xd.to(low))


class DoraConv(Dora):
    """DoRA on ``nn.Conv1d`` / ``nn.Conv2d``: one magnitude per output channel."""

    lora: LoraConv

    def _matrices(self, weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        # (C_out, C_in·Πk), (r, C_in·Πk), (C_out, r)
        return weight.flatten(1), self.lora.A.flatten(1), self.lora.B.flatten(1)

    def _out_shape(self, weight: Tensor) -> tuple[int, ...]:
        return (-1,) + (1,) * (weight.dim() - 2)  # channels before the spatial dims

    def _compute_norm(self, weight: Tensor) -> Tensor:
        if self.lora.groups == 1:
            return super()._compute_norm(weight)
        # A grouped convolution's update is block-diagonal: form V = W + ΔW (a conv weight is small).
        dtype = torch.promote_types(weight.dtype, torch.float32)
        V = weight.to(dtype) + self.lora.delta_weight(weight).to(weight.device, dtype)  # (C_out, C_in/g, *k)
        return torch.linalg.vector_norm(V.flatten(1), dim=1).clamp_min_(torch.finfo(dtype).tiny)

    def _weight_shape(self, weight: Tensor) -> tuple[int, ...]:
        return (-1,) + (1,) * (weight.dim() - 1)


class DoraEmbedding(Dora):
    """DoRA on ``nn.Embedding`` (V, d): one magnitude per embedding dimension, as in PEFT."""

    lora: LoraEmbedding

    def _matrices(self, weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return weight.t(), self.lora.A, self.lora.B     # (d, V), (r, V), (d, r)

    def _weight_shape(self, weight: Tensor) -> tuple[int, ...]:
        return (1, -1)


_DORA_FOR: dict[type[Adapter], type[Dora]] = {
    LoraLinear: DoraLinear,
    LoraConv: DoraConv,
    LoraEmbedding: DoraEmbedding,
}


@dataclasses.dataclass(frozen=True)
class DoraConfig(LoraConfig):
    """DoRA hyperparameters: exactly LoRA's (rank, alpha, dropout, rslora, init, patterns).

    The magnitude m adds d_out trainable parameters per adapted layer.
    """

    method: ClassVar[str] = "dora"

    __hash__ = LoraConfig.__hash__  # a dataclass subclass would otherwise hash its dict fields

    def build(self, name: str, base: nn.Module) -> Adapter | None:
        lora = super().build(name, base)
        if lora is None:
            return None
        return _DORA_FOR[type(lora)](lora, base_weight(base))
