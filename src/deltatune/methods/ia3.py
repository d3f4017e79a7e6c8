"""(IA)³: Infused Adapter by Inhibiting and Amplifying Inner Activations (Liu et al., "Few-Shot
Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning", NeurIPS 2022,
arXiv:2205.05638).

    keys, values:           h = l ⊙ (W x + b)                 l ∈ R^{d_out}, l = 1 at initialisation
    feed-forward (down):    h = W (l ⊙ x) + b                 l ∈ R^{d_in}

Learned vectors rescale the keys, the values and the feed-forward block's hidden activations.
In the paper ``l_ff`` scales the FFN's hidden state before its down-projection, so on the
down-projection (``feedforward`` modules) it acts on the input side; everywhere else on the output.
Both forms fold into the weights: output side ``W ← diag(l) W, b ← l ⊙ b``, input side
``W ← W diag(l)``. Unmerging divides by ``l`` (exact up to rounding); a vector with a zero entry
cannot be merged, since that scaling cannot be undone.

Same definition as Hugging Face PEFT's ``IA3Config`` (``target_modules`` + ``feedforward_modules``),
tested for parity. Differences of placement only: GPT-2 fuses q, k, v into ``c_attn``, so its
default scales the queries too (as PEFT's default does); for BERT the default feed-forward target
is the FFN's ``output.dense`` only, whereas PEFT's suffix ``output.dense`` also catches
``attention.output.dense``.
Supported layers: ``nn.Linear``, GPT-2 ``Conv1D``, ``nn.Conv1d/2d/3d`` (channel-wise; input side
needs ``groups=1``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from deltatune.config import AdapterConfig, Target
from deltatune.core.products import plain_linear
from deltatune.core.layer import Adapter
from deltatune.core.layers import describe
from deltatune.core.targeting import any_matches
from deltatune.methods.ia3_kernels import ia3_linear

# Output projection of the feed-forward block: BERT/RoBERTa, Llama/Mistral/Qwen, GPT-2.
FEEDFORWARD_DOWN = (r"re:.*\.layer\.\d+\.output\.dense", "down_proj", "mlp.c_proj")
KEYS_VALUES = ("attention.self.key", "attention.self.value", "k_proj", "v_proj", "c_attn")


class IA3(Adapter):
    """Scale a layer's input (``feedforward``) or output channels by a learned vector ``scale``.

    ``layout`` says how the base weight stores the channels: ``"linear"`` (d_out, d_in),
    ``"conv1d_t"`` (GPT-2 ``Conv1D``: d_in, d_out) or ``"conv"`` (C_out, C_in, *k) with ``spatial`` axes.
    """

    def __init__(self, size: int, feedforward: bool = False, layout: str = "linear", spatial: int = 0) -> None:
        super().__init__()
        self.feedforward, self.layout, self.spatial = feedforward, layout, spatial
        self.scale = nn.Parameter(torch.ones(size))  # (d_in,) if feedforward else (d_out,)

    def extra_repr(self) -> str:
        return f"size={self.scale.numel()}, feedforward={self.feedforward}, layout={self.layout}"

    def _channels(self, t: Tensor) -> Tensor:
        # Channels are the last axis for linear layers, the axis before ``spatial`` ones for convs.
        return self.scale.to(t.dtype).view(-1, *(1,) * self.spatial)

    def forward(self, x: Tensor, base: Any) -> Tensor:
        if self._fusable(x, base):  # one autograd node, the scaling folded into the weight
            return ia3_linear(x, base.weight, base.bias, self.scale.to(x.dtype), self.feedforward)
        if self._fusable_under_autocast(base):
            # The kernel in the autocast dtype (the product's dtype under autocast); the casts are
            # autograd ops, so the vector's gradient arrives in its own dtype.
            low = torch.get_autocast_dtype(x.device.type)
            with torch.autocast(x.device.type, enabled=False):
                bias = None if base.bias is None else base.bias.to(low)
                return ia3_linear(x.to(low), base.weight.to(low), bias, self.scale.to(low), self.feedforward)
        if self.feedforward:
            return base(x * self._channels(x))        # W (l ⊙ x) + b
        h = base(x)
        return h * self._channels(h)                  # l ⊙ (W x + b)

    def _fusable(self, x: Tensor, base: Any) -> bool:
        """A plain frozen ``nn.Linear`` in x's dtype, outside autocast (methods/ia3_kernels.py)."""
        return (self.layout == "linear" and plain_linear(base)
                and base.weight.dtype == x.dtype and (base.bias is None or base.bias.dtype == x.dtype)
                and not torch.is_autocast_enabled(x.device.type))

    def _fusable_under_autocast(self, base: Any) -> bool:
        """A plain frozen float32/bf16 ``nn.Linear`` under autocast (outside its CUDA/CPU dtypes: no)."""
        if self.layout != "linear" or not plain_linear(base):
            return False
        device = base.weight.device.type
        return (torch.is_autocast_enabled(device) and base.weight.dtype in (torch.float32, torch.bfloat16)
                and torch.get_autocast_dtype(device) in (torch.bfloat16, torch.float16))

    def _weight_factor(self, weight: Tensor) -> Tensor:
        """``scale`` shaped to multiply ``weight`` along the scaled channel axis."""
        l = self.scale.to(weight.dtype)
        out_axis = {"linear": 0, "conv": 0, "conv1d_t": 1}[self.layout]
        axis = 1 - out_axis if self.feedforward else out_axis
        shape = [1] * weight.dim()
        shape[axis] = -1
        return l.view(shape)

    @torch.no_grad()
    def merge_into(self, base: nn.Module) -> None:
        if (self.scale == 0).any():
            raise ValueError("an (IA)³ vector with a zero entry cannot be merged: unmerging would divide by zero")
        base.weight.mul_(self._weight_factor(base.weight))
        if not self.feedforward and base.bias is not None:
            base.bias.mul_(self.scale.to(base.bias.dtype))

    @torch.no_grad()
    def unmerge_from(self, base: nn.Module) -> None:
        base.weight.div_(self._weight_factor(base.weight))
        if not self.feedforward and base.bias is not None:
            base.bias.div_(self.scale.to(base.bias.dtype))


@dataclasses.dataclass(frozen=True)
class IA3Config(AdapterConfig):
    """(IA)³.

    Attributes:
        target: layers to scale; default keys, values and the feed-forward down-projection.
        feedforward: patterns (same syntax as ``target``) of the targets scaled on their input
            side; default the feed-forward down-projections.
    """

    method: ClassVar[str] = "ia3"
    family: ClassVar[str] = "addition"
    suggested_lr: ClassVar[float | None] = 3e-3  # T-Few (Liu et al. 2022): scaling vectors start at 1 and move slowly
    default_target: ClassVar[Target] = KEYS_VALUES + FEEDFORWARD_DOWN

    feedforward: tuple[str, ...] = FEEDFORWARD_DOWN

    def validate(self) -> None:
        value = (self.feedforward,) if isinstance(self.feedforward, str) else tuple(self.feedforward)
        if not all(isinstance(p, str) for p in value):
            raise ValueError(f"ia3 feedforward must be module name patterns, got {self.feedforward!r}")
        object.__setattr__(self, "feedforward", value)

    def build(self, name: str, base: nn.Module) -> Adapter | None:
        ff = any_matches(name, self.feedforward)
        spec = describe(base)
        if spec is not None and spec.kind == "linear":
            return IA3(spec.d_in if ff else spec.d_out, ff, layout="conv1d_t" if spec.transposed else "linear")
        if spec is not None and spec.kind == "conv" and not spec.transposed:
            if ff and spec.groups != 1:
                raise ValueError(f"ia3 scales the input of {name!r} (a feedforward module) but it is a grouped "
                                 "convolution; remove it from feedforward")
            return IA3(spec.d_in if ff else spec.d_out, ff, "conv", spec.spatial)
        return None
