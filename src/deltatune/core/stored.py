"""An adapter as a value, apart from any model and any file: what a save holds.

:class:`StoredAdapter` is the one form every path goes through::

    model --capture--> StoredAdapter --formats.<name>.write--> directory      (save_adapter)
    directory --formats.<name>.read--> StoredAdapter --install--> model      (load_adapter)
    directory --read--> StoredAdapter --write--> directory                   (convert)
    directory --read--> StoredAdapter --hotswap.swap_in--> existing adapter  (hotswap_adapter)

Why here, in core: capturing and installing need only what core knows (``attach``, ``detach``,
the adapted layers, the config *object*), and never a file format or a method. Turning a config
dict into an object, and a file into a value, happens above, in :mod:`deltatune.formats`.

There is one check of a value's tensors against what a model needs (:func:`check_tensors`): the
same keys, the same shapes, errors naming the key as the file spells it (``Source.names``: PEFT's
``base_model.model...lora_A.weight`` for a PEFT file) and saying what to do. :func:`install` runs
it after attaching and detaches on any error, so a failed load leaves the model's module tree
and ``state_dict`` keys exactly as before; hot swap runs the same check on the modules it builds.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from deltatune.config import AdapterConfig
from deltatune.core.files import WEIGHTS_FILE
from deltatune.core.fingerprint import differences, fingerprint
from deltatune.core.active import mark_trainable
from deltatune.core.inject import attach, detach, rename
from deltatune.core.records import adapted_layers, AdapterRecord, configs, placement, record, records
from deltatune.core.layer import AdaptedLayer, FullCopy, logical_get, logical_modules


@dataclass(frozen=True)
class Source:
    """Where a value was read from, for error messages only."""

    where: str  # the directory, which starts every error
    weights: str = WEIGHTS_FILE  # the tensor file's name
    show: Callable[[str], str] = str  # our key -> the key as the file spells it (PEFT's differ)


@dataclass
class StoredAdapter:
    """An adapter's config, placement, ``modules_to_save``, tensors and free-form meta.

    ``parts`` holds one list of module names per part of the config (a single method is one
    part). ``tensors`` are keyed ``<module name>.<tensor name inside the adapter>``, e.g.
    ``encoder.layer.0.attention.self.query.A``. ``meta`` carries what a format wants to keep and
    core does not interpret, apart from ``adapter_name`` (the default name on install) and
    ``base_fingerprint`` (compared on install, see :mod:`deltatune.core.fingerprint`).
    """

    config: AdapterConfig
    parts: list[list[str]]
    modules_to_save: list[str]
    tensors: dict[str, Tensor]
    meta: dict[str, Any] = field(default_factory=dict)
    source: Source | None = None

    @property
    def targets(self) -> list[str]:
        """The adapted modules (every part's, once each), ``modules_to_save`` apart. For several
        parts, in the order of their first tensor: the model's module order, as :func:`capture` walks it."""
        names = list(dict.fromkeys(n for names in self.parts for n in names))
        if len(self.parts) == 1:
            return names
        first: dict[str, int] = {}
        for i, key in enumerate(self.tensors):
            for n in names:
                if n not in first and key.startswith(f"{n}."):
                    first[n] = i
        return sorted(names, key=lambda n: first.get(n, len(self.tensors)))

    def replace(self, **changes: Any) -> StoredAdapter:
        return dataclasses.replace(self, **changes)


def _to_cpu(t: Tensor) -> Tensor:
    return t.detach().to("cpu").contiguous()


def adapter_state(model: nn.Module, name: str, tensor: Callable[[Tensor], Tensor] = _to_cpu
                  ) -> tuple[dict[str, Tensor], list[str], list[str]]:
    """The adapter's tensors by saved key (each passed through ``tensor``), plus its target and
    ``modules_to_save`` module names, in module order. No checks: see :func:`capture`."""
    tensors: dict[str, Tensor] = {}
    targets: list[str] = []
    saved: list[str] = []
    for layer_name, layer in adapted_layers(model):
        if name not in layer.adapters:
            continue
        adapter = layer.adapters[name]
        (saved if isinstance(adapter, FullCopy) else targets).append(layer_name)
        for key, t in adapter.state_dict().items():
            tensors[f"{layer_name}.{key}"] = tensor(t)
    return tensors, targets, saved


def capture(model: nn.Module, name: str, tensor: Callable[[Tensor], Tensor] = _to_cpu) -> StoredAdapter:
    """Adapter ``name`` of ``model`` as a value. ``tensor`` turns each live tensor into the saved
    one (default: detached, on CPU, contiguous; distributed saving gathers shards there).

    The same walk over the model on every call, so collectives inside ``tensor`` pair up across ranks.
    """
    if name not in configs(model):
        have = ", ".join(repr(n) for n in configs(model)) or "none"
        raise ValueError(f"no adapter named {name!r} to save (attached: {have})")
    for layer_name, layer in adapted_layers(model):
        if name in layer.merged:
            raise RuntimeError(f"adapter {name!r} is merged into {layer_name!r}; unmerge(model) before saving it")
    tensors, targets, saved = adapter_state(model, name, tensor)
    config = configs(model)[name]
    bases = {n: layer.base for n, layer in adapted_layers(model) if n in targets}
    meta = {
        "adapter_name": name,
        # The base layer types (e.g. Linear, Embedding), so converters to other formats, which name
        # tensors per layer type, work from the files alone.
        "module_types": {n: type(base).__name__ for n, base in bases.items()},
        # Shapes and a hash of a few base weights, so loading onto another base can warn (fingerprint.py).
        "base_fingerprint": fingerprint(bases),
    }
    parts = [list(p) for p in placement(model, name)] if len(config.parts) > 1 else [targets]
    return StoredAdapter(config, parts, saved, tensors, meta)


def check_tensors(expected: Mapping[str, torch.Size | tuple[int, ...]], tensors: Mapping[str, Tensor],
                  source: Source) -> None:
    """Every expected key present with its shape, and no other key; the first mismatch raises a
    ``ValueError`` naming the key as the file spells it."""
    where, weights = source.where, source.weights
    for key, shape in expected.items():
        if key not in tensors:
            raise ValueError(f"{where}: tensor {source.show(key)!r} is missing from {weights}")
        if tuple(tensors[key].shape) != tuple(shape):
            raise ValueError(
                f"{where}: tensor {source.show(key)!r} has shape {tuple(tensors[key].shape)} but this model "
                f"needs {tuple(shape)}: the adapter's config implies {tuple(shape)} here; the adapter was "
                "trained on a different base model, or its config does not match its tensors")
    for key in tensors:
        if key not in expected:
            raise ValueError(f"{where}: unexpected tensor {source.show(key)!r} in {weights}")


def _check_modules(model: nn.Module, value: StoredAdapter, source: Source) -> None:
    """Every module the value adapts exists in ``model``; the error names a tensor that is for it."""
    modules = dict(logical_modules(model))
    for missing in [m for m in value.targets + value.modules_to_save if m not in modules]:
        key = next((k for k in value.tensors if k.startswith(f"{missing}.")), None)
        why = f" (tensor {source.show(key)!r} is for module {missing!r})" if key else ""
        raise ValueError(f"{source.where}: the adapter needs module {missing!r}, which this model does not "
                         f"have{why}; it was trained on a different base model")


def copy_in(model: nn.Module, name: str, tensors: Mapping[str, Tensor]) -> None:
    """Copy ``tensors`` (already checked) into adapter ``name``'s modules."""
    with torch.no_grad():
        for layer_name, layer in adapted_layers(model):
            if name in layer.adapters:
                adapter = layer.adapters[name]
                adapter.load_state_dict({k: tensors[f"{layer_name}.{k}"] for k in adapter.state_dict()}, strict=True)


def install(model: nn.Module, value: StoredAdapter, name: str | None = None, *, activate: bool = True,
            trainable: bool = False) -> str:
    """Attach ``value`` to ``model`` as adapter ``name`` and copy its tensors in. Returns the name.

    Every module, key and shape is checked before the model keeps anything: on any error the
    adapter is detached again, so the module tree and ``state_dict`` keys are exactly as before.
    After it, only ``name`` trains if ``trainable``; an activated inference load freezes all.
    """
    source = value.source or Source("adapter")
    name = name or value.meta.get("adapter_name") or "default"
    _check_modules(model, value, source)
    attach(model, value.config, name, activate=activate, part_names=value.parts, save_names=value.modules_to_save)
    try:
        expected, _, _ = adapter_state(model, name, tensor=lambda t: t)
        check_tensors({k: t.shape for k, t in expected.items()}, value.tensors, source)
        copy_in(model, name, value.tensors)
    except Exception:
        detach(model, name)
        raise
    _warn_other_base(model, value, name, source)
    if trainable:
        mark_trainable(model, [name])
    elif activate:
        for p in model.parameters():
            p.requires_grad_(False)
    return name


def _warn_other_base(model: nn.Module, value: StoredAdapter, name: str, source: Source,
                     bases: dict[str, nn.Module] | None = None) -> None:
    saved = value.meta.get("base_fingerprint")
    if saved is None:
        return
    if bases is None:
        bases = {n: layer.base for n, layer in adapted_layers(model) if name in layer.adapters}
    changed = differences(saved, bases)
    if changed:
        more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
        warnings.warn(f"{source.where}: this base model is not the one the adapter was saved with: {changed[0]}"
                      f"{more}; it loads, but its outputs will differ from the trained run's", stacklevel=4)


def holding(model: nn.Module, name: str) -> list[AdaptedLayer]:
    """The adapted layers that hold adapter ``name``, found from its record (the modules each part
    was built on, and ``modules_to_save``) rather than by walking the model; a walk when the record
    does not account for every layer (an adapter placed by other means)."""
    return _holding(model, name, record(model, name))


def _holding(model: nn.Module, name: str, rec: AdapterRecord) -> list[AdaptedLayer]:
    found: dict[int, AdaptedLayer] = {}
    for module_name in (*(n for part in rec.placement for n in part), *rec.saved):
        try:
            layer = logical_get(model, module_name)
        except KeyError:
            break
        if isinstance(layer, AdaptedLayer) and name in layer.adapters._modules:
            found[id(layer)] = layer
    else:
        if rec.layer_count is None:  # once per record: the modules don't change while it is attached
            rec.layer_count = sum(name in layer.adapters._modules for _, layer in adapted_layers(model))
        if rec.layer_count == len(found):
            return list(found.values())
    return [layer for _, layer in adapted_layers(model) if name in layer.adapters._modules]


def reinstall(model: nn.Module, value: StoredAdapter, name: str, old: str) -> bool:
    """Install ``value`` as adapter ``name`` into the modules of attached adapter ``old``, which goes.

    The same as ``detach(model, old)`` then ``install(model, value, name, activate=False)``, without
    building, placing or freezing modules: the tensors are copied into ``old``'s, which are renamed.
    For a server that swaps adapters of one shape in and out of a fixed number of slots. Returns
    False, with the model untouched, when ``old``'s modules are not exactly what ``value`` needs
    (another config, other modules, ``modules_to_save``, model-level hooks, merged or active,
    other tensor shapes): then detach and install.
    """
    have = records(model)
    gone = have.get(old)
    if name in have:
        raise ValueError(f"an adapter named {name!r} is already attached; detach it first or choose another name")
    if (gone is None or gone.handles or gone.saved or value.modules_to_save or gone.config != value.config
            or gone.placement != [list(p) for p in value.parts]):
        return False
    held = holding(model, old)  # from the record, without walking the model
    if any(old in layer.merged or old in layer.active for layer in held):
        return False
    try:  # each layer's logical name (the stored tensors' prefix), from the placement
        names = {id(logical_get(model, n)): n for part in gone.placement for n in part}
    except KeyError:
        return False
    if any(id(layer) not in names for layer in held):
        return False
    current = {names[id(layer)]: layer.adapters[old].state_dict(keep_vars=True) for layer in held}
    expected = {f"{n}.{k}": t.shape for n, tensors in current.items() for k, t in tensors.items()}
    if expected.keys() != value.tensors.keys() or any(tuple(value.tensors[k].shape) != tuple(shape)
                                                      for k, shape in expected.items()):
        return False
    rename(model, old, name, held)
    with torch.no_grad():
        for n, tensors in current.items():
            for k, t in tensors.items():
                t.copy_(value.tensors[f"{n}.{k}"])
    _warn_other_base(model, value, name, value.source or Source("adapter"),
                     {names[id(layer)]: layer.base for layer in held})
    return True
