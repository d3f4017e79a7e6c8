"""What kind of layer a base module is, answered once: :func:`describe`.

Every method needs the same few facts about the module it adapts: is it a linear map, a
convolution, an embedding table, a normalisation; how many features go in and out; how its weight
is laid out. :func:`describe` answers them for every method, so no method sniffs class names::

    spec = describe(base)        # LayerSpec(kind='linear', d_in=768, d_out=2304, transposed=True)
    if spec is None or spec.kind != "linear":
        return None              # the method cannot adapt this module

Weight layout per kind (``transposed`` flips the first two axes):

- ``linear``: ``nn.Linear`` (and subclasses), weight (d_out, d_in). transformers' GPT-2 ``Conv1D``
  is a linear layer whose weight is stored (d_in, d_out): ``transposed=True``. It is recognised by
  its structure (an integer ``nf`` = d_out and a (d_in, nf) weight), so transformers is not imported;
- ``conv``: ``nn.Conv1d/2d/3d`` (any ``_ConvNd``), weight (d_out, d_in / groups, *kernel); their
  transposes (``nn.ConvTranspose*d``) have ``transposed=True`` and weight (d_in, d_out / groups, *kernel);
- ``embedding`` / ``embedding_bag``: ``nn.Embedding`` / ``nn.EmbeddingBag``, a table
  (d_in = vocabulary size, d_out = embedding size);
- ``norm``: LayerNorm- and RMSNorm-like layers (``nn.LayerNorm``, ``nn.RMSNorm`` and classes whose
  name ends in ``LayerNorm`` / ``RMSNorm``, as transformers names them); d_in = d_out = the number of
  normalised features (0 if the layer keeps neither a ``normalized_shape`` nor a weight);
- ``batch_norm``: ``nn.BatchNorm1d/2d/3d`` (any ``_BatchNorm``): per-channel statistics and affine
  parameters on axis 1 of an (N, C, *spatial) input; d_in = d_out = C.

Quantized layers (bitsandbytes, torchao) will be described with ``quantized`` set to their storage
format (e.g. ``"nf4"``); their describer must run before the ``nn.Linear`` check, since some of them
subclass ``nn.Linear``. Until then ``quantized`` is always ``None``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

Kind = Literal["linear", "conv", "embedding", "embedding_bag", "norm", "batch_norm"]

_NORM_SUFFIXES = ("LayerNorm", "RMSNorm")


@dataclass(frozen=True)
class LayerSpec:
    """One base layer, as methods see it (see the module docs for the weight layout of each kind).

    Attributes:
        kind: linear | conv | embedding | embedding_bag | norm | batch_norm.
        d_in / d_out: input and output features (channels for a convolution; vocabulary and
            embedding size for a table; the normalised size for a norm).
        transposed: the weight is stored input-first (GPT-2 ``Conv1D``, ``nn.ConvTranspose*d``).
        kernel / stride / padding / dilation: a convolution's geometry (``()`` otherwise).
        groups: a convolution's groups (1 otherwise).
        quantized: the weight's quantized storage format, ``None`` for a floating-point weight.
    """

    kind: Kind
    d_in: int
    d_out: int
    transposed: bool = False
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] | str = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    quantized: str | None = None

    @property
    def spatial(self) -> int:
        """Number of spatial axes of a convolution (1 for Conv1d, 2 for Conv2d...); 0 otherwise."""
        return len(self.kernel)


def describe(base: nn.Module) -> LayerSpec | None:
    """What kind of layer ``base`` is, with its sizes; ``None`` for a module of no known kind."""
    if isinstance(base, nn.Linear):
        return LayerSpec("linear", base.in_features, base.out_features)
    if is_transposed_linear(base):
        d_in, d_out = base.weight.shape
        return LayerSpec("linear", int(d_in), int(d_out), transposed=True)
    if isinstance(base, _ConvNd):
        return LayerSpec("conv", base.in_channels, base.out_channels, transposed=base.transposed,
                         kernel=tuple(base.kernel_size), stride=tuple(base.stride), padding=base.padding,
                         dilation=tuple(base.dilation), groups=base.groups)
    if isinstance(base, nn.Embedding):
        return LayerSpec("embedding", base.num_embeddings, base.embedding_dim)
    if isinstance(base, nn.EmbeddingBag):
        return LayerSpec("embedding_bag", base.num_embeddings, base.embedding_dim)
    if isinstance(base, _BatchNorm):
        return LayerSpec("batch_norm", base.num_features, base.num_features)
    if isinstance(base, (nn.LayerNorm, nn.RMSNorm)) or type(base).__name__.endswith(_NORM_SUFFIXES):
        size = _normalised_size(base)
        return LayerSpec("norm", size, size)
    return None


def is_transposed_linear(module: nn.Module) -> bool:
    """transformers' GPT-2 ``Conv1D``: ``y = x W + b`` with W (d_in, nf); known by that structure.

    The same answer as ``describe(module)`` giving a transposed ``linear``, cheap enough for a
    forward pass (no :class:`LayerSpec` is built)."""
    nf = module.__dict__.get("nf")
    weight = module._parameters.get("weight")
    return isinstance(nf, int) and isinstance(weight, Tensor) and weight.dim() == 2 and weight.shape[1] == nf


def _normalised_size(norm: nn.Module) -> int:
    shape = getattr(norm, "normalized_shape", None)
    if shape is not None:
        return math.prod((shape,) if isinstance(shape, int) else shape)
    weight = norm._parameters.get("weight")
    return weight.numel() if weight is not None else 0
