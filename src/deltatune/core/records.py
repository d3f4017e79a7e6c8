"""What a model holds for each attached adapter: one :class:`AdapterRecord` per name.

The records live in one dict on the model itself (``model.__dict__`` entry ``_deltatune_adapters``,
outside ``state_dict``): the adapter's config, the modules each part was built on, the hooks its
config installed, and the engine's caches built from it. Dropping a record (``inject.detach``,
``delete_adapter``, ``unwrap``) frees everything that refers to the adapter. Which adapters are
active or merged is read from the layers (``core/active.py``), never duplicated here.
"""

from __future__ import annotations

import re
import types
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from deltatune.config import AdapterConfig
from deltatune.core.layer import AdaptedLayer, walk

_RECORDS = "_deltatune_adapters"
NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")


@dataclass(eq=False)
class AdapterRecord:
    """Everything the model holds for one adapter name, so that dropping it frees it all.

    Attributes:
        config: the adapter's config (a config may replace itself on attach, e.g. to record what it
            read from the model: assign ``record.config``).
        placement: per part of ``config.parts``, the modules that part was built on.
        saved: the modules trained in full (``modules_to_save``).
        handles: removable hooks the config installed (``on_attach``); removed with the record.
        caches: what the engine derived from this adapter's tensors (e.g. a layer's stacked
            low-rank factors for routing), by key. A cache built from several adapters is stored
            under the same key in each of their records, and dropping any one of them drops it
            from all (see :func:`cached`, :func:`store`).
    """

    config: AdapterConfig
    placement: list[list[str]]
    saved: list[str] = field(default_factory=list)
    handles: list[Any] = field(default_factory=list)
    caches: dict[Hashable, Any] = field(default_factory=dict)
    layer_count: int | None = None  # how many layers hold it, counted once (checks core.stored.holding)


def records(model: nn.Module) -> dict[str, AdapterRecord]:
    """Adapter name -> :class:`AdapterRecord` for every adapter attached to ``model`` (attach order)."""
    return model.__dict__.setdefault(_RECORDS, {})


def record(model: nn.Module, name: str) -> AdapterRecord:
    """The record of adapter ``name``; ``ValueError`` naming the attached ones if there is none."""
    return records(model)[known(model, name)]


def configs(model: nn.Module) -> Mapping[str, AdapterConfig]:
    """Adapter name -> config for every adapter attached to ``model`` (attach order); read-only."""
    return types.MappingProxyType({n: r.config for n, r in records(model).items()})


def placement(model: nn.Module, name: str) -> list[list[str]]:
    """Per part of adapter ``name``, the modules it adapts (one list for a single-method adapter)."""
    return record(model, name).placement


def cached(model: nn.Module, names: Sequence[str], key: Hashable) -> Any:
    """The cache ``key`` built from adapters ``names`` (``None`` if there is none)."""
    return records(model)[names[0]].caches.get(key) if names else None


def store(model: nn.Module, names: Sequence[str], key: Hashable, value: Any) -> None:
    """Keep ``value`` as cache ``key`` of every adapter in ``names``, until any of them is dropped."""
    for n in names:
        records(model)[n].caches[key] = value


def drop(model: nn.Module, name: str) -> None:
    """Forget adapter ``name``: its record, its hooks, and every cache built from it."""
    gone = records(model).pop(name)
    for handle in gone.handles:
        handle.remove()
    for key in gone.caches:
        for other in records(model).values():
            other.caches.pop(key, None)
    gone.caches.clear()
    gone.handles.clear()


def drop_all(model: nn.Module) -> None:
    """Forget every adapter of ``model`` (as :func:`drop` each) and the records' dict itself."""
    for name in list(records(model)):
        drop(model, name)
    model.__dict__.pop(_RECORDS, None)


def adapted_layers(model: nn.Module) -> Iterator[tuple[str, AdaptedLayer]]:
    """Every AdaptedLayer with its logical name (the name its base module had)."""
    for name, module, _ in walk(model):
        if isinstance(module, AdaptedLayer):
            yield name, module


def known(model: nn.Module, name: str) -> str:
    if name not in records(model):
        have = ", ".join(repr(n) for n in configs(model)) or "none"
        raise ValueError(f"no adapter named {name!r} is attached (attached: {have})")
    return name
