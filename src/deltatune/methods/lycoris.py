"""Shared by the LyCORIS-family methods (LoHa, LoKr): an update ΔW built in full, applied like the base.

LoHa and LoKr parameterise ΔW by products (Hadamard, Kronecker) that have no cheap low-rank form
to apply to x, so, as LyCORIS and Hugging Face PEFT do, the adapter builds ΔW (in the base
weight's shape) and runs the base layer's own operation with it: ``base(x) + op(x, ΔW)``. Merging
is then ``W ± ΔW``, written once in ``core/merge.py``.

This file holds what the two methods share: which layers they adapt and in which shape, the
forward above with PEFT's two regularisers (rank dropout and module dropout), and the CP
("effective conv", FedPara Proposition 3) rebuild of a convolution kernel from a small core.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deltatune.core.layer import Adapter
from deltatune.core.layers import LayerSpec, describe


def supported(base: nn.Module) -> LayerSpec | None:
    """The description of ``base`` if it is a layer these methods adapt (Linear, GPT-2 ``Conv1D``,
    Conv1d, Conv2d), else ``None``."""
    spec = describe(base)
    if spec is None or not (spec.kind == "linear" or (spec.kind == "conv" and not spec.transposed
                                                      and spec.spatial in (1, 2))):
        return None
    return spec


def kaiming_(*tensors: Tensor) -> None:
    for t in tensors:
        nn.init.kaiming_uniform_(t, a=math.sqrt(5))


def cp_kernel(core: Tensor, w_out: Tensor, w_in: Tensor) -> Tensor:
    """K[o, i, *k] = Σ_pq core[p, q, *k] w_out[p, o] w_in[q, i].   core (r, r, *k), w_out (r, out), w_in (r, in)."""
    return torch.einsum("pq...,po,qi->oi...", core, w_out, w_in)


class FullDeltaAdapter(Adapter):
    """``base(x) + op(x, ΔW)`` where ``op`` is the base's linear map or convolution.

    Subclasses implement :meth:`make_delta` (ΔW as (d_out, d_in, *k), scaling included).
    ``rank_dropout`` zeroes whole output rows of ΔW in training (rescaled by the kept share when
    ``rescale``); ``module_dropout`` skips the adapter for a whole batch with that probability.
    """

    def __init__(self, base: nn.Module, rank_dropout: float = 0.0, module_dropout: float = 0.0,
                 rescale: bool = True) -> None:
        super().__init__()
        spec = supported(base)
        if spec is None:
            raise ValueError(f"{type(self).__name__} supports Linear, GPT-2 Conv1D, Conv1d and Conv2d, "
                             f"not {type(base).__name__}")
        if spec.kind == "conv" and base.padding_mode != "zeros":
            raise ValueError(f"{type(self).__name__} supports convolutions with padding_mode='zeros' only")
        self.d_out, self.d_in, self.kernel = spec.d_out, spec.d_in // spec.groups, spec.kernel  # ΔW (d_out, d_in, *k)
        self.kernel_numel = math.prod(self.kernel)  # 1 for linear layers
        self.transposed = spec.transposed
        self.rank_dropout, self.module_dropout, self.rescale = rank_dropout, module_dropout, rescale
        if self.kernel:
            self.conv = F.conv1d if len(self.kernel) == 1 else F.conv2d
            self.conv_args = dict(stride=base.stride, padding=base.padding, dilation=base.dilation,
                                  groups=base.groups)

    def make_delta(self) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor, base: Any) -> Tensor:
        h = base(x)
        if self.training and self.module_dropout > 0 and torch.rand(()) < self.module_dropout:
            return h
        delta = self.make_delta().to(x.dtype)          # (d_out, d_in, *k)
        if self.training and self.rank_dropout > 0:
            keep = (torch.rand(self.d_out, device=delta.device) >= self.rank_dropout).to(delta.dtype)
            if self.rescale:
                keep = keep / keep.mean().clamp_min(1e-12)
            delta = delta * keep.view(-1, *([1] * (delta.dim() - 1)))
        if self.kernel:
            return h + self.conv(x, delta, None, **self.conv_args)
        return h + F.linear(x, delta)

    def delta_weight(self, base: nn.Module) -> Tensor:
        delta = self.make_delta()
        return delta.t() if self.transposed else delta


def validate_rank_and_dropouts(config: Any, label: str) -> None:
    """The checks LoHa and LoKr share: rank (and per-module ranks) >= 1, dropouts in [0, 1)."""
    if config.rank < 1:
        raise ValueError(f"{label} rank must be >= 1, got {config.rank}")
    for pattern, rank in config.rank_pattern.items():
        if rank < 1:
            raise ValueError(f"{label} rank must be >= 1, got rank_pattern[{pattern!r}] = {rank}")
    if config.alpha == 0 or any(a == 0 for a in config.alpha_pattern.values()):
        raise ValueError(f"{label} alpha must not be 0: the update is scaled by alpha/rank and would always be zero")
    for name in ("rank_dropout", "module_dropout"):
        if not 0.0 <= getattr(config, name) < 1.0:
            raise ValueError(f"{label} {name} must be in [0, 1), got {getattr(config, name)}")
