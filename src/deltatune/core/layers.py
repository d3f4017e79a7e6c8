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
  (d_in = vocabulary size, d_out = embedding size). A bag reduces the rows of each bag (``offsets``
  or a 2-D input) by ``sum`` / ``mean`` / ``max``; sum and mean are linear in the table, so an adapter
  that adds a table ``D`` adds ``bag_like(base, D, ids)``: the same reduction over ``D``;
- ``norm``: LayerNorm- and RMSNorm-like layers (``nn.LayerNorm``, ``nn.RMSNorm`` and classes whose
  name ends in ``LayerNorm`` / ``RMSNorm``, as transformers names them); d_in = d_out = the number of
  normalised features (0 if the layer keeps neither a ``normalized_shape`` nor a weight);
- ``batch_norm``: ``nn.BatchNorm1d/2d/3d`` (any ``_BatchNorm``): per-channel statistics and affine
  parameters on axis 1 of an (N, C, *spatial) input; d_in = d_out = C.

Quantized linear layers (bitsandbytes' ``Linear4bit`` / ``Linear8bitLt``, deltatune's torchao NF4
layer) are ``linear`` with ``quantized`` set to their storage format (``"nf4"``, ``"fp4"``, ``"int8"``).
The core never imports a quantization library: :data:`QUANTIZED_FORMATS` is a small table of
:class:`QuantizedFormat` entries (recognise a module, dequantize its weight), filled by
``integrations/quantize.py`` with one explicit statement in ``deltatune/__init__.py`` (as
``core/plumbing.py`` is). Their check runs before the ``nn.Linear`` one, since some subclass it.
Methods that need the base weight itself (a weight-norm decomposition, a merge) read it through
:func:`base_weight`, which dequantizes on the fly; the rest just call ``base(x)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from deltatune.core.layer import call_args

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


@dataclass(frozen=True)
class QuantizedFormat:
    """One library's quantized linear layers, as the core sees them (see the module docs).

    Attributes:
        backend: the library, e.g. ``"bitsandbytes"``.
        format_of: the storage format of a module (``"nf4"``, ``"int8"``...), ``None`` if the
            module is not one of this library's quantized layers. Must not import the library.
        dequantize: the module's weight as a floating-point (d_out, d_in) tensor (a new tensor).
        computes_as: ``compute_as(module, x)``, the dtype ``d`` when calling the module on ``x``
            computes ``F.linear(x.to(d), deq(W).to(d), b).to(x.dtype)`` with nothing else (no hook, no
            repacked inference layout, no autocast), so a kernel may compute it from the dequantized
            weight instead; ``None`` when the module must be called. Optional: ``None`` means never.
    """

    backend: str
    format_of: Callable[[nn.Module], str | None]
    dequantize: Callable[[nn.Module], Tensor]
    computes_as: Callable[[nn.Module, Tensor], torch.dtype | None] | None = None


#: Filled by ``deltatune/__init__.py`` from ``integrations/quantize.py``; empty means none known.
QUANTIZED_FORMATS: list[QuantizedFormat] = []


def quantized_format(module: Any) -> tuple[QuantizedFormat, str] | None:
    """``(entry, storage format)`` for a quantized linear layer, ``None`` for any other module."""
    if not isinstance(module, nn.Module):
        module = getattr(module, "module", None)  # a stacked adapter's base: the frozen module
        if not isinstance(module, nn.Module):
            return None
    for entry in QUANTIZED_FORMATS:
        fmt = entry.format_of(module)
        if fmt is not None:
            return entry, fmt
    return None


def base_weight(base: Any) -> Tensor:
    """The base layer's weight as a floating-point tensor: ``base.weight`` itself for a plain layer,
    a freshly dequantized (d_out, d_in) copy for a quantized one (so writing to it changes nothing)."""
    found = quantized_format(base)
    if found is None:
        return base.weight
    module = base if isinstance(base, nn.Module) else base.module
    return found[0].dequantize(module)


def dequantized_weight_fn(base: Any, x: Tensor) -> Callable[[], Tensor] | None:
    """For a quantized linear layer that a kernel may compute from its weight, called on ``x``: a
    function returning its dequantized weight (d_out, d_in) in ``x``'s dtype, a new tensor on each
    call (so a kernel can dequantize again in backward instead of keeping it, as the libraries' own
    autograd functions do). ``None`` for any other module, for hooks, and when the layer computes in
    another dtype than ``x``'s (see :attr:`QuantizedFormat.computes_as`): then it must be called."""
    if not isinstance(base, nn.Module) or base._forward_hooks or base._forward_pre_hooks \
            or base._backward_hooks or base._backward_pre_hooks:
        return None
    found = quantized_format(base)
    if found is None or found[0].computes_as is None or found[0].computes_as(base, x) != x.dtype:
        return None
    dequantize, dtype = found[0].dequantize, x.dtype  # not x itself: a kernel may keep this function

    def weight() -> Tensor:
        w = dequantize(base)
        return w if w.dtype == dtype else w.to(dtype)
    return weight


def describe(base: nn.Module) -> LayerSpec | None:
    """What kind of layer ``base`` is, with its sizes; ``None`` for a module of no known kind."""
    if QUANTIZED_FORMATS:
        found = quantized_format(base)
        if found is not None:
            return LayerSpec("linear", int(base.in_features), int(base.out_features), quantized=found[1])
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


def linear_bag(bag: Any) -> str | None:
    """Why an adapter that adds a table cannot adapt ``bag`` (an ``nn.EmbeddingBag``), or ``None``.

    ``max`` bags are not linear in the table, and ``max_norm`` rewrites the table's rows in place."""
    if bag.mode == "max":
        return "a mode='max' EmbeddingBag is not linear in its table; use mode='sum' or 'mean'"
    if bag.max_norm is not None:
        return "an EmbeddingBag with max_norm rescales its table's rows in place; use max_norm=None"
    return None


def bag_like(base: Any, table: Tensor, ids: Tensor, padding_idx: int | None | str = "same") -> Tensor:
    """``base``'s bag reduction (its mode, the ``offsets`` and ``per_sample_weights`` it was called
    with, ``include_last_offset``, ``padding_idx``) applied to ``ids`` over another ``table`` (n, k).

    ``base`` is what an adapter receives (the frozen ``nn.EmbeddingBag``, possibly behind other
    adapters); ``padding_idx`` overrides the base's, for a table whose rows are renumbered.
    Returns (bags, k)."""
    args, kwargs = call_args(base)
    names = ("offsets", "per_sample_weights")
    bound = dict(zip(names, args), **kwargs)
    pad = base.padding_idx if padding_idx == "same" else padding_idx
    return F.embedding_bag(ids, table, bound.get("offsets"), mode=base.mode,
                           per_sample_weights=bound.get("per_sample_weights"),
                           include_last_offset=base.include_last_offset, padding_idx=pad)
