"""Visual prompting: a learned padding prompt added to the input image (Bahng, Jahanian, Sankaranarayanan
& Isola, "Exploring Visual Prompts for Adapting Large-Scale Models", 2022, arXiv:2203.17274).

    x' = x + v,     v = 0 inside, learned on a border of width p,     y = f(x'; θ) with θ frozen

The prompt lives in pixel space, so it works on any image model: it is applied to the input of
the model's first convolution (the stem, or a ViT's patch embedding), which is where the
normalised picture enters. ``v`` is four strips (top, bottom: (C, p, S); left, right:
(C, S − 2p, p)) at a reference resolution ``S = size``; an input of another size gets the prompt
resized bilinearly, so the border keeps its share of the picture (Bahng et al.: p = 30 at 224).
The strips start at zero, so the adapted model starts as the base model. Bahng et al. start from
random values and train with SGD at lr 40; with zeros and AdamW an lr around 1e-2 works.

Not mergeable: ``conv(x + v) = conv(x) + conv(v)`` is a position-dependent bias map, not a change
of the convolution's weight. An addition-family method (Delta Tuning taxonomy).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deltatune.config import AdapterConfig
from deltatune.core.layer import Adapter, logical_modules
from deltatune.core.layers import describe
from deltatune.core.targeting import NoMatchError, select


class PaddingPrompt(Adapter):
    """``base(x + v)`` with ``v`` learned on a border of width ``pad`` of a ``size`` × ``size`` picture."""

    def __init__(self, channels: int, size: int = 224, pad: int = 30) -> None:
        super().__init__()
        inner = size - 2 * pad
        self.size, self.pad = size, pad
        self.top = nn.Parameter(torch.zeros(channels, pad, size))       # (C, p, S)
        self.bottom = nn.Parameter(torch.zeros(channels, pad, size))    # (C, p, S)
        self.left = nn.Parameter(torch.zeros(channels, inner, pad))     # (C, S-2p, p)
        self.right = nn.Parameter(torch.zeros(channels, inner, pad))    # (C, S-2p, p)

    def extra_repr(self) -> str:
        return f"channels={self.top.shape[0]}, size={self.size}, pad={self.pad}"

    def prompt(self, height: int, width: int) -> Tensor:
        """The prompt v (C, height, width): zero inside, the strips on the border."""
        C, inner = self.top.shape[0], self.size - 2 * self.pad
        middle = torch.cat([self.left, self.top.new_zeros(C, inner, inner), self.right], dim=2)  # (C, S-2p, S)
        v = torch.cat([self.top, middle, self.bottom], dim=1)                                  # (C, S, S)
        if (height, width) != (self.size, self.size):
            v = F.interpolate(v[None], size=(height, width), mode="bilinear", align_corners=False)[0]
        return v

    def forward(self, x: Tensor, base: Any) -> Tensor:
        v = self.prompt(x.shape[-2], x.shape[-1]).to(x.dtype)   # (C, H, W), broadcast over the batch
        return base(x + v)


def _picture_input(module: nn.Module) -> bool:
    spec = describe(module)
    return spec is not None and spec.kind == "conv" and spec.spatial == 2 and not spec.transposed


@dataclasses.dataclass(frozen=True)
class VisualPromptConfig(AdapterConfig):
    """Visual prompt (padding).

    Attributes:
        pad: p, the border width in pixels at the reference size (Bahng et al.: 30 at 224).
        size: S, the reference resolution of the prompt; other input sizes get it resized.

    ``target=None`` picks the model's first 2-D convolution (the one that reads the picture);
    name another layer that receives the picture with ``target``.
    """

    method: ClassVar[str] = "visual_prompt"
    family: ClassVar[str] = "addition"
    suggested_lr: ClassVar[float | None] = 1e-2  # zero-initialised strips, AdamW (see the module docs)
    default_target: ClassVar[Any] = None

    pad: int = 30
    size: int = 224

    def validate(self) -> None:
        if self.pad < 1 or self.size < 1 or 2 * self.pad >= self.size:
            raise ValueError(f"visual_prompt needs 1 <= pad < size / 2 (a border around an unprompted centre); "
                             f"got pad={self.pad}, size={self.size}")

    def build(self, name: str, base: nn.Module) -> Adapter | None:
        if not _picture_input(base):
            return None
        return PaddingPrompt(describe(base).d_in, self.size, self.pad)  # type: ignore[union-attr]

    def select_modules(self, model: nn.Module) -> list[str]:
        if self.target is not None:  # the named layers that read pictures (2-D convolutions)
            chosen = dict(logical_modules(model))
            names = [n for n in select(model, self.target, self.exclude, self.layers).names if _picture_input(chosen[n])]
            if not names:
                raise NoMatchError(f"visual_prompt: target {self.target!r} names no 2-D convolution to feed the "
                                   "prompted picture to")
            return names
        first = next((n for n, m in logical_modules(model) if n and _picture_input(m)), None)
        if first is None:
            raise NoMatchError(f"visual_prompt found no 2-D convolution in {type(model).__name__} to feed the "
                               "prompted picture to; name the layer that reads the picture with target=[...]")
        return [first]
