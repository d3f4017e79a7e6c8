"""Bottleneck adapters: small down-project / non-linearity / up-project modules added to a frozen
network.

    sequential:  h = M(x);   h + s · W_up f(W_down h)          (Houlsby et al., 2019; Pfeiffer et al., 2021)
    parallel:    M(x) + s · W_up f(W_down x)                    (He et al., 2022)

with ``W_down ∈ R^{r×d}``, ``W_up ∈ R^{d×r}``, ``r = d / reduction_factor`` (or ``bottleneck_size``),
``f`` the activation and ``s`` the scaling. ``W_up`` starts at zero, so the adapted model starts as
the base model (the near-identity initialisation of Houlsby et al.) while ``W_down`` gets gradients
from the first step.

References: Houlsby et al., "Parameter-Efficient Transfer Learning for NLP", ICML 2019,
arXiv:1902.00751; Pfeiffer et al., "AdapterFusion", EACL 2021, arXiv:2005.00247; He et al.,
"Towards a Unified View of Parameter-Efficient Transfer Learning", ICLR 2022, arXiv:2110.04366.

Placement. An adapter wraps one module ``M``. Houlsby et al. put the adapter after the projection
that closes each sublayer, before the residual sum; wrapping that projection (BERT
``attention.output.dense`` / ``output.dense``, Llama ``o_proj`` / ``down_proj``, GPT-2
``attn.c_proj`` / ``mlp.c_proj``) is exactly that. ``houlsby`` adapts both sublayers, ``pfeiffer``
only the feed-forward one.

``parallel`` runs the adapter *beside* ``M`` on ``M``'s input. He et al. place it beside the whole
feed-forward sublayer, fed with the sublayer's input. A whole-sublayer module exists in Llama and
GPT-2 (``mlp``) and can be targeted (the adapter's sizes are read from the module's first and
last linear layers), but not in BERT, whose FFN is split over two modules; and wrapping a
non-leaf module hides its linear layers from other adapters. So the default places the parallel
adapter beside the FFN's down-projection, fed with the FFN's hidden activation
(``d_ff → r → d``); ``target=["mlp"]`` gives He et al.'s exact placement on Llama / GPT-2.

Conv features (Conv-Adapter, Chen et al., 2022, arXiv:2208.07463): on a convolution, a
BatchNorm or a block of them (a ResNet / MobileNet block), the same adapter acts on the channel axis
of (N, C, H, W) features, i.e. as a pair of 1×1 convolutions ``C → r → C``.

Not mergeable: the non-linearity cannot be folded into the base weights.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deltatune.config import AdapterConfig, Target
from deltatune.core.layer import Adapter
from deltatune.core.layers import describe

Variant = Literal["houlsby", "pfeiffer", "parallel"]
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "swish": nn.SiLU, "tanh": nn.Tanh, "identity": nn.Identity,
}
# Projections closing the attention / feed-forward sublayers in BERT-like, Llama-like and GPT-2 models.
ATTENTION_OUT = ("attention.output.dense", "o_proj", "attn.c_proj")
FEEDFORWARD_OUT = (r"re:.*\.layer\.\d+\.output\.dense", "down_proj", "mlp.c_proj")


class Bottleneck(Adapter):
    """``h + s·up(f(down(h)))`` after ``base`` (sequential) or ``base(x) + s·up(f(down(x)))`` (parallel)."""

    def __init__(self, d_in: int, d_out: int, size: int, activation: str = "relu", scaling: float = 1.0,
                 parallel: bool = False, channels_first: bool = False) -> None:
        super().__init__()
        self.parallel, self.scaling, self.channels_first = parallel, scaling, channels_first
        self.down = nn.Linear(d_in if parallel else d_out, size)  # (r, d)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(size, d_out)                          # (d, r)
        with torch.no_grad():
            self.up.weight.zero_()
            self.up.bias.zero_()
            self.down.bias.zero_()

    def extra_repr(self) -> str:
        return f"parallel={self.parallel}, scaling={self.scaling:g}" + (", channels_first" if self.channels_first else "")

    def forward(self, x: Tensor, base: Any) -> Tensor:
        h = base(x)                                              # (..., d_out) or (N, d_out, *spatial)
        z = x if self.parallel else h                            # (..., d_in) or (..., d_out)
        if self.channels_first:  # conv features: the bottleneck is a pair of 1×1 convolutions
            flat = z.to(self.down.weight.dtype).flatten(2)                               # (N, d, L)
            u = F.conv1d(self.act(F.conv1d(flat, self.down.weight[:, :, None], self.down.bias)),
                         self.up.weight[:, :, None], self.up.bias)                        # (N, d_out, L)
            return h + u.view(h.shape).to(h.dtype) * self.scaling
        u = self.up(self.act(self.down(z.to(self.down.weight.dtype)))).to(h.dtype)
        return h + u * self.scaling


def _linear_dims(module: nn.Module) -> tuple[int, int] | None:
    spec = describe(module)
    return (spec.d_in, spec.d_out) if spec is not None and spec.kind == "linear" else None


def _conv_dims(module: nn.Module) -> tuple[int, int] | None:
    """Channels in and out of a convolution or a BatchNorm (features laid out (N, C, *spatial))."""
    spec = describe(module)
    if spec is not None and ((spec.kind == "conv" and not spec.transposed)
                             or spec.kind == "batch_norm"):
        return spec.d_in, spec.d_out
    return None


def io_dims(module: nn.Module) -> tuple[int | None, int] | None:
    """(input size, output size) of ``module``: for a linear layer its own; for an embedding
    (None, dim); for a container such as an MLP block, those of its first and last linear layers."""
    spec = describe(module)
    if spec is not None and spec.kind == "linear":
        return spec.d_in, spec.d_out
    if spec is not None and spec.kind == "embedding":
        return None, spec.d_out
    inner = [d for m in module.modules() if m is not module and (d := _linear_dims(m)) is not None]
    return (inner[0][0], inner[-1][1]) if inner else None


def conv_io_dims(module: nn.Module) -> tuple[int, int] | None:
    """Channels in and out of a convolution, a BatchNorm, or a block of them (its first and last
    convolutions: e.g. a ResNet or MobileNet block), for bottlenecks on conv features."""
    own = _conv_dims(module)
    if own is not None:
        return own
    inner = [d for m in module.modules() if m is not module and (d := _conv_dims(m)) is not None]
    if not inner or any(_linear_dims(m) is not None for m in module.modules()):
        return None
    return inner[0][0], inner[-1][1]


@dataclasses.dataclass(frozen=True)
class BottleneckConfig(AdapterConfig):
    """Bottleneck adapter.

    Attributes:
        variant: ``houlsby`` (after attention and feed-forward), ``pfeiffer`` (after feed-forward)
            or ``parallel`` (beside the feed-forward down-projection); sets the default target.
        reduction_factor: bottleneck size r = d_out // reduction_factor (at least 1).
        bottleneck_size: r directly; overrides ``reduction_factor``.
        activation: relu | gelu | silu (swish) | tanh | identity.
        scaling: s, the factor on the adapter's output (He et al. use 4 for parallel adapters).
    """

    method: ClassVar[str] = "bottleneck"
    family: ClassVar[str] = "addition"
    suggested_lr: ClassVar[float | None] = 5e-3  # measured on the tweet-sentiment task (4,000 examples, one epoch): at 1e-3 it stayed near the majority class
    search_space: ClassVar[dict[str, Any]] = {"reduction_factor": (16, 8, 32),  # plan / tune / compare --grid
                                              "variant": ("pfeiffer", "houlsby", "parallel")}
    default_target: ClassVar[Target] = FEEDFORWARD_OUT

    variant: Variant = "pfeiffer"
    reduction_factor: int = 16
    bottleneck_size: int | None = None
    activation: str = "relu"
    scaling: float = 1.0

    def validate(self) -> None:
        if self.variant not in ("houlsby", "pfeiffer", "parallel"):
            raise ValueError(f"bottleneck variant must be houlsby, pfeiffer or parallel; got {self.variant!r}")
        if self.reduction_factor < 1:
            raise ValueError(f"bottleneck reduction_factor must be >= 1, got {self.reduction_factor}")
        if self.bottleneck_size is not None and self.bottleneck_size < 1:
            raise ValueError(f"bottleneck_size must be >= 1, got {self.bottleneck_size}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"bottleneck activation must be one of {', '.join(ACTIVATIONS)}; got {self.activation!r}")

    @property
    def resolved_target(self) -> Target:
        if self.target is not None:
            return self.target
        return ATTENTION_OUT + FEEDFORWARD_OUT if self.variant == "houlsby" else FEEDFORWARD_OUT

    def build(self, name: str, base: nn.Module) -> Adapter | None:
        dims, channels_first = io_dims(base), False
        if dims is None:
            dims, channels_first = conv_io_dims(base), True
        parallel = self.variant == "parallel"
        if dims is None or (parallel and (dims[0] is None or channels_first)):  # parallel: linear layers only
            return None
        d_in, d_out = dims
        size = self.bottleneck_size or max(1, d_out // self.reduction_factor)
        return Bottleneck(d_in or d_out, d_out, size, self.activation, self.scaling, parallel, channels_first)
