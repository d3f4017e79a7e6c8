"""BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based Masked Language-models
(Ben Zaken, Ravfogel & Goldberg, ACL 2022, arXiv:2106.10199).

    h = W x + (b + Δb),    only Δb trains (Δb = 0 at initialisation)

Only the bias terms train. Here they train as *bias deltas* ``Δb`` added to the frozen layer's
output, broadcast along its output channel, so the base stays bit-identical and the delta saves,
loads, switches and merges like any other adapter (merging adds ``Δb`` into the base bias).

Hugging Face PEFT has no BitFit method (its LoRA ``bias="all"`` unfreezes the biases in place,
changing the base); the tests check the formula in float64 and that training the deltas ends where
training the biases themselves ends.

Supported layers (those with a bias): ``nn.Linear``, transformers' GPT-2 ``Conv1D``, convolutions
(``nn.Conv1d/2d/3d`` and their transposes; the bias broadcasts over the channel axis), BatchNorm
(the shift β, per channel; MobileNet's and ResNet's convolutions have no bias of their own) and
normalisation layers (LayerNorm, and RMSNorm where it has a bias: the bias has the normalised shape). By default every such layer except the
model's output head trains (a new head usually goes in ``modules_to_save``). Models without
biases (Llama) have nothing to adapt.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from deltatune.config import AdapterConfig, Target
from deltatune.core.layer import Adapter
from deltatune.core.layers import describe
from deltatune.core.targeting import NoMatchError, output_head_names, select


CHANNEL_FIRST = -1  # the bias is per channel on axis 1, whatever the number of spatial axes (BatchNorm)


def _has_bias(module: nn.Module) -> bool:
    return isinstance(getattr(module, "bias", None), nn.Parameter)


def _bias_layout(module: nn.Module) -> int | None:
    """How the bias broadcasts: the number of spatial axes after the channel axis (0 for layers
    whose bias lines up with the trailing axes), or ``None`` for an unsupported layer."""
    spec = describe(module)
    if spec is None or not _has_bias(module):
        return None
    if spec.kind == "conv":
        return spec.spatial
    if spec.kind == "batch_norm":
        return CHANNEL_FIRST
    return 0 if spec.kind in ("linear", "norm") else None


def has_trainable_bias(name: str, module: nn.Module) -> bool:
    return _bias_layout(module) is not None


class BiasDelta(Adapter):
    """``base(x) + Δb``: a bias delta of the base bias's shape, zero at initialisation."""

    def __init__(self, shape: tuple[int, ...], spatial: int = 0) -> None:
        super().__init__()
        self.spatial = spatial  # 0: the bias lines up with the trailing axes; k: (C, *k spatial axes)
        self.bias_delta = nn.Parameter(torch.zeros(shape))  # same shape as the base bias

    def forward(self, x: Tensor, base: Any) -> Tensor:
        h = base(x)                                              # (N, ..., C) or (N, C, *L)
        spatial = h.dim() - 2 if self.spatial == CHANNEL_FIRST else self.spatial
        b = self.bias_delta.view(-1, *(1,) * spatial) if spatial else self.bias_delta
        return h + b.to(h.dtype)

    @torch.no_grad()
    def merge_into(self, base: nn.Module) -> None:
        base.bias.add_(self.bias_delta.to(base.bias.dtype))

    @torch.no_grad()
    def unmerge_from(self, base: nn.Module) -> None:
        base.bias.sub_(self.bias_delta.to(base.bias.dtype))


@dataclasses.dataclass(frozen=True)
class BitFitConfig(AdapterConfig):
    """BitFit. ``target=None`` means every layer with a bias except the output head."""

    method: ClassVar[str] = "bitfit"
    family: ClassVar[str] = "specification"
    suggested_lr: ClassVar[float | None] = 1e-2  # measured on the tweet-sentiment task (4,000 examples, one epoch): at 1e-3 it stayed near the majority class
    default_target: ClassVar[Target] = staticmethod(has_trainable_bias)  # type: ignore[assignment]

    def build(self, name: str, base: nn.Module) -> Adapter | None:
        spatial = _bias_layout(base)
        return None if spatial is None else BiasDelta(tuple(base.bias.shape), spatial)

    def select_modules(self, model: nn.Module) -> list[str]:
        names = select(model, self.resolved_target, self.exclude, self.layers).names
        if self.target is None:
            heads = output_head_names(model)
            names = [n for n in names if n not in heads]
            if not names:
                raise NoMatchError(
                    f"bitfit found no layer with a bias besides the output head of {type(model).__name__}")
        return names
