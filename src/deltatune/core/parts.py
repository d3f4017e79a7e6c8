"""Which adapter modules a config built: found from the model's structure, never from back-pointers.

An adapter name holds one config with its ``parts`` (a single method is one part, a
:class:`~deltatune.config.HybridConfig` has several).
``attach`` records, per part, the modules it built on (``placement``); where parts meet on one
module they sit in a :class:`~deltatune.core.layer.Composite` in part order. So a config's hooks
(``on_attach``, ``on_step``, ``regularization``) find their own adapters with
:func:`adapters_of`, and no adapter module points back at its config.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from deltatune.config import AdapterConfig
from deltatune.core.records import adapted_layers, configs, placement, record
from typing import Any

from deltatune.core.layer import AdaptedLayer, Composite


def replace_part(model: nn.Module, name: str, old: AdapterConfig, new: AdapterConfig) -> None:
    """Record ``new`` in place of part ``old`` of adapter ``name`` (its whole config if ``old`` is it)."""
    rec = record(model, name)
    if rec.config is old:
        rec.config = new
    else:
        rec.config = dataclasses.replace(rec.config, parts=tuple(new if p is old else p for p in rec.config.parts))


def adapters_of(model: nn.Module, name: str, part: AdapterConfig | None = None) -> list[tuple[str, nn.Module]]:
    """``(module name, adapter module)`` for every module adapter ``name`` adapts, in attach order.

    With ``part``, only the modules built by the parts of ``name`` equal to ``part`` (equal configs
    build equal adapters: a hybrid that repeats a config is served as one); without it, every
    part's. A module a hybrid adapts with several parts yields each part's own module, not the
    :class:`Composite`. Modules trained in full (``modules_to_save``) are not parts.
    """
    placed = placement(model, name)  # per part, the modules it built on
    parts = configs(model)[name].parts
    layers = {n: layer for n, layer in adapted_layers(model) if name in layer.adapters}
    found = []
    for i, (config, names) in enumerate(zip(parts, placed)):
        if part is not None and config != part:
            continue
        earlier = [set(n) for n in placed[:i]]
        for module_name in names:
            adapter = layers[module_name].adapters[name]
            if isinstance(adapter, Composite):  # one slot per part placed here, in part order
                adapter = adapter.parts[sum(module_name in e for e in earlier)]
            found.append((module_name, adapter))
    return found


def find_part(layer: AdaptedLayer, name: str, capability: type) -> Any:
    """Adapter ``name`` on ``layer``, or its part with ``capability`` (a ``core.contract`` Protocol,
    e.g. ``VirtualTokens``) if it is a hybrid's Composite."""
    adapter = layer.adapters[name]
    parts = adapter.parts if isinstance(adapter, Composite) else [adapter]
    found = [p for p in parts if isinstance(p, capability)]
    if len(found) != 1:
        raise ValueError(f"adapter {name!r} must hold exactly one virtual-token part ({capability.__name__}) "
                         f"on {type(layer.base).__name__}")
    return found[0]
