"""Fold adapters into the base weights, and undo it.

Written once for every method: each adapter knows how to add its update to the base module
(``Adapter.merge_into`` / ``unmerge_from``, by default ``W ± delta_weight``). Merging is always an
explicit call; nothing merges as a side effect of ``.eval()``.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from deltatune.core.active import active_adapters
from deltatune.core.inject import unwrap
from deltatune.core.records import adapted_layers, configs
from deltatune.core.layers import quantized_format


def merge(model: nn.Module, names: str | Iterable[str] | None = None) -> nn.Module:
    """Fold adapters ``names`` (default: the active ones) into the base weights.

    Merged adapters are skipped in forward, so outputs are unchanged (within the method's
    ``merge_atol``) and inference runs at the base model's speed. Raises before changing any
    weight if one of the adapters cannot be merged.
    """
    names = active_adapters(model) if names is None else ((names,) if isinstance(names, str) else tuple(names))
    for n in names:
        if n not in configs(model):
            raise ValueError(f"no adapter named {n!r} is attached")
    layers = list(adapted_layers(model))
    for layer_name, layer in layers:
        for n in names:
            if n in layer.adapters and not layer.adapters[n].mergeable:
                raise ValueError(
                    f"adapter {n!r} ({configs(model)[n].method}) on {layer_name!r} cannot be merged into "
                    "the base weights; keep it unmerged"
                )
        if any(n in layer.adapters for n in names) and (found := quantized_format(layer.base)) is not None:
            # W + ΔW in 4 or 8 bits would round most of a small update away, and unmerge could not undo it.
            raise ValueError(
                f"{layer_name!r} has a quantized ({found[1]}) base; merging into it would round the update "
                "away. Call deltatune.dequantize(model) first (and deltatune.quantize(model, ...) after, "
                "if you want it quantized again), or use `deltatune merge --quantize none|nf4|int8`"
            )
    for _, layer in layers:
        for n in names:
            if n in layer.adapters and n not in layer.merged:
                layer.adapters[n].merge_into(layer.base)
                layer.merged.append(n)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Take every merged adapter back out of the base weights (last merged first)."""
    for _, layer in adapted_layers(model):
        while layer.merged:
            layer.adapters[layer.merged.pop()].unmerge_from(layer.base)
    return model


def merge_and_unload(model: nn.Module, names: str | Iterable[str] | None = None) -> nn.Module:
    """Merge ``names`` (default: active) and return the plain model, with no adapter left.

    The result has exactly the original module tree and ``state_dict`` keys, so transformers'
    ``save_pretrained`` writes it and plain transformers reloads it.
    """
    merge(model, names)
    return unwrap(model)
