"""Attach and detach adapters and choose the active ones (what is trainable: ``core/report.py``).

Everything here works on any ``nn.Module`` by module replacement: a selected module is wrapped in
an :class:`AdaptedLayer` in its parent, and ``detach`` puts the original object back, so
``state_dict()`` keys are exactly as before.

What the model knows about an adapter name is one :class:`AdapterRecord` (its config, the modules
each part was built on, the hooks its config installed, and the engine's caches built from it),
kept in one dict on the model itself (``model.__dict__`` entry ``_deltatune_adapters``, outside
``state_dict``). ``detach``, ``delete_adapter`` and ``unwrap`` drop the record and with it
everything that refers to the adapter. Which adapters are active or merged is read from the
layers, never duplicated. Every config has ``parts`` (a single method is a hybrid of one part),
so nothing here asks what kind of config it holds.
"""

from __future__ import annotations

import contextlib
import re
import types
import warnings
from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from deltatune.config import AdapterConfig
from deltatune.core.layer import AdaptedLayer, Composite, FullCopy, walk, logical_get, logical_modules
from deltatune.core.layers import describe, quantized_format
from deltatune.core.report import AttachReport, ParamReport, parameter_report
from deltatune.core.targeting import NoMatchError, modules_for, select

_RECORDS = "_deltatune_adapters"
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")


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
    return records(model)[_known(model, name)]


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


def _drop(model: nn.Module, name: str) -> None:
    """Forget adapter ``name``: its record, its hooks, and every cache built from it."""
    gone = records(model).pop(name)
    for handle in gone.handles:
        handle.remove()
    for key in gone.caches:
        for other in records(model).values():
            other.caches.pop(key, None)
    gone.caches.clear()
    gone.handles.clear()


def adapted_layers(model: nn.Module) -> Iterator[tuple[str, AdaptedLayer]]:
    """Every AdaptedLayer with its logical name (the name its base module had)."""
    for name, module, _ in walk(model):
        if isinstance(module, AdaptedLayer):
            yield name, module


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = logical_get(model, parent_name)
    parent = parent.base if isinstance(parent, AdaptedLayer) else parent
    setattr(parent, leaf, module)


def _wrap(model: nn.Module, name: str) -> AdaptedLayer:
    current = logical_get(model, name)
    if isinstance(current, AdaptedLayer):
        return current
    layer = AdaptedLayer(current)
    layer.training = current.training  # an eval model stays in eval (not recursive: base keeps its modes)
    _set_module(model, name, layer)
    return layer


def attach(
    model: nn.Module,
    config: AdapterConfig,
    name: str = "default",
    *,
    activate: bool = True,
    module_names: Iterable[str] | None = None,
    save_names: Iterable[str] | None = None,
    part_names: Sequence[Sequence[str]] | None = None,
) -> AttachReport:
    """Attach a new adapter called ``name`` to ``model`` as ``config`` describes.

    The base model is frozen; the new adapter's parameters are trainable. With ``activate`` the
    new adapter becomes the only active one. ``part_names`` (one list per part of
    ``config.parts``; ``module_names`` is the one list of a one-part config) and ``save_names``
    bypass target selection with exact module names (used when loading a saved adapter).
    """
    if not _NAME_RE.match(name):
        raise ValueError(f"adapter name {name!r} must be an identifier such as 'default' or 'sentiment'")
    if name in records(model):
        raise ValueError(f"an adapter named {name!r} is already attached; detach it first or choose another name")
    modules = dict(logical_modules(model))
    if part_names is None and module_names is not None:
        part_names = [module_names]
    part_names, save_names = _choose(model, name, config, modules, part_names, save_names)
    # Build every adapter before touching the model, so a failure leaves it unchanged.
    built, placed, skipped = _build_parts(config, part_names, modules)
    _install(model, name, built, save_names, modules)
    records(model)[name] = new = AdapterRecord(config, placed, save_names)
    try:  # model-level checks run here; a refusal must leave the model as it was
        new.handles = list(config.on_attach(model, name))
    except Exception:
        detach(model, name)
        raise
    if activate:
        set_active(model, name)
    else:
        mark_trainable(model)
    return _report(model, name, list(built), save_names, skipped)


def _choose(model: nn.Module, name: str, config: AdapterConfig, modules: dict[str, nn.Module],
            part_names: Sequence[Sequence[str]] | None,
            save_names: Iterable[str] | None) -> tuple[list[list[str]], list[str]]:
    """Per part, the modules it adapts, and the modules trained in full; checked against the model."""
    parts = config.parts
    if part_names is None:
        part_names = [modules_for(model, p) for p in parts]
    if save_names is None:
        save_names = select(model, list(config.modules_to_save)).names if config.modules_to_save else []
    part_names, save_names = [list(n) for n in part_names], list(save_names)
    if len(part_names) != len(parts):
        raise ValueError(f"expected {len(parts)} lists of module names (one per part), got {len(part_names)}")
    for missing in [n for names in part_names for n in names + save_names if n not in modules]:
        raise ValueError(f"adapter {name!r} needs module {missing!r}, which this model does not have")
    overlap = {n for names in part_names for n in names} & set(save_names)
    if overlap:
        raise ValueError(f"module {sorted(overlap)[0]!r} is both a target and in modules_to_save; keep it in one")
    for module_name in save_names:  # checked here, before anything is installed
        if (found := quantized_format(modules[module_name])) is not None:
            raise ValueError(f"{module_name!r} is stored quantized ({found[1]}) and cannot train in full; keep it "
                             f"in full precision (deltatune.quantize(..., skip=[{module_name.rsplit('.', 1)[-1]!r}]))")
    return part_names, save_names


def _build_parts(config: AdapterConfig, part_names: list[list[str]], modules: dict[str, nn.Module]
                 ) -> tuple[dict[str, list[nn.Module]], list[list[str]], list[str]]:
    """Every part's adapters by module (parts meeting on a module in part order), the modules each
    part was really built on, and the modules skipped as unsupported."""
    built: dict[str, list[nn.Module]] = {}
    placed: list[list[str]] = []
    skipped: list[str] = []
    for part, names in zip(config.parts, part_names):
        built_part, skipped_part = _build(part, names, modules)
        for module_name, adapter in built_part:
            built.setdefault(module_name, []).append(adapter)
        placed.append([n for n, _ in built_part])
        skipped += skipped_part
    return built, placed, skipped


def _install(model: nn.Module, name: str, built: dict[str, list[nn.Module]], save_names: list[str],
             modules: dict[str, nn.Module]) -> None:
    """Put the built adapters (and the full copies of ``save_names``) into their layers as ``name``."""
    for module_name, adapters in built.items():
        adapter = adapters[0] if len(adapters) == 1 else Composite(adapters)
        # Adapters live where their base lives, in its precision.
        ref = next((p for p in modules[module_name].parameters() if p.is_floating_point()), None)
        if ref is not None:
            adapter.to(device=ref.device, dtype=ref.dtype)
        _wrap(model, module_name).adapters[name] = adapter.train(modules[module_name].training)
    for module_name in save_names:
        _wrap(model, module_name).adapters[name] = FullCopy(modules[module_name]).train(modules[module_name].training)


def _report(model: nn.Module, name: str, targets: list[str], save_names: list[str],
            skipped: list[str]) -> AttachReport:
    adapter_params = sum(
        p.numel() for _, layer in adapted_layers(model) if name in layer.adapters
        for p in layer.adapters[name].parameters()
    )
    report = parameter_report(model)
    return AttachReport(
        name=name,
        method=records(model)[name].config.method,
        targets=targets,
        modules_to_save=save_names,
        adapter_parameters=adapter_params,
        trainable_parameters=report.trainable,
        total_parameters=report.total,
        skipped=skipped,
    )


def _explicit(target: object) -> bool:
    """Whether a target names modules one by one (then an unsupported one is an error)."""
    if target is None or callable(target):
        return False
    patterns = (target,) if isinstance(target, str) else tuple(target)
    return not any(p in ("all-linear", "all-conv") or p.startswith("re:") for p in patterns)


def _build(config: AdapterConfig, names: list[str], modules: dict[str, nn.Module]) -> tuple[list, list[str]]:
    built, skipped = [], []
    for module_name in names:
        adapter = config.build(module_name, modules[module_name])
        if adapter is None:
            skipped.append(f"{module_name} ({type(modules[module_name]).__name__})")
        else:
            built.append((module_name, adapter))
    if names and not built:  # no names: the method chose none (a linear probe trains only its heads)
        raise NoMatchError(
            f"{config.method} cannot adapt any of the {len(names)} selected modules "
            f"(e.g. {skipped[0]}); target layers of a supported type instead"
        )
    if skipped and _explicit(config.target):
        raise ValueError(f"{config.method} cannot adapt {skipped[0]}; remove it from the target")
    _warn_full_rank(config, [(n, modules[n]) for n, _ in built])
    return built, skipped


def _warn_full_rank(config: AdapterConfig, modules: list[tuple[str, nn.Module]]) -> None:
    """Warn (once per attach) where a config's declared ``update_rank`` reaches a layer's smaller side."""
    over = []
    for module_name, base in modules:
        rank, weight = config.update_rank(module_name), getattr(base, "weight", None)
        if rank is None or not isinstance(weight, torch.Tensor) or weight.dim() < 2:
            continue
        spec = describe(base)
        if spec is not None and spec.quantized:  # packed storage: its shape is not the layer's
            side = min(spec.d_in, spec.d_out)
        else:
            side = min(weight.shape[0], weight[0].numel())  # (out, in, *k) or Conv1D's (in, out): same min
        if rank >= side:
            d_in, d_out = getattr(base, "in_features", None), getattr(base, "out_features", None)
            shape = f"{d_in} -> {d_out}" if d_in and d_out else f"weight {tuple(weight.shape)}"
            over.append(f"rank {rank} on {module_name!r} ({shape}) is at or above min(d_in, d_out)={side}")
    if over:
        more = f" (and {len(over) - 1} more modules)" if len(over) > 1 else ""
        warnings.warn(f"{over[0]}{more}: the update is full rank there and the adapter stores more numbers "
                      "than the weight itself; lower the rank or exclude the module", stacklevel=4)


def detach(model: nn.Module, name: str | None = None) -> nn.Module:
    """Remove adapter ``name`` (all adapters if ``None``), unmerging it first if it is merged.

    Layers left with no adapters are replaced by their original module object; the adapter's
    record (config, hooks, caches) is dropped, so nothing keeps its tensors. Returns ``model``.
    """
    names = list(records(model)) if name is None else [_known(model, name)]
    for layer_name, layer in list(adapted_layers(model)):
        for n in names:
            if n in layer.merged:
                layer.adapters[n].unmerge_from(layer.base)
                layer.merged.remove(n)
            if n in layer.adapters:
                del layer.adapters[n]
        layer.active = tuple(a for a in layer.active if a not in names)
        if len(layer.adapters) == 0:
            _set_module(model, layer_name, layer.base)
    for n in names:
        _drop(model, n)
    return model


def rename(model: nn.Module, old: str, new: str, layers: list[AdaptedLayer] | None = None) -> None:
    """Give attached adapter ``old`` the name ``new``: its record and its module in every layer
    (it becomes the last attached, as if attached now). Caches built from it are dropped.
    Refused for an adapter with model-level hooks (they may hold the name). ``layers``: the layers
    that hold ``old``, when the caller has them (``core.stored.holding``)."""
    if not _NAME_RE.match(new):
        raise ValueError(f"adapter name {new!r} must be an identifier such as 'default' or 'sentiment'")
    if new in records(model):
        raise ValueError(f"an adapter named {new!r} is already attached; detach it first or choose another name")
    gone = records(model)[_known(model, old)]
    if gone.handles:
        raise ValueError(f"adapter {old!r} acts through model-level hooks and cannot be renamed; detach and attach it")
    for key in list(gone.caches):
        for other in records(model).values():
            other.caches.pop(key, None)
    gone.caches.clear()
    for layer in (layer for _, layer in adapted_layers(model)) if layers is None else layers:
        if old in layer.adapters:
            module = layer.adapters[old]
            del layer.adapters[old]
            layer.adapters[new] = module
        layer.active = tuple(new if n == old else n for n in layer.active)
        layer.merged = [new if n == old else n for n in layer.merged]
    records(model)[new] = records(model).pop(old)


def unwrap(model: nn.Module) -> nn.Module:
    """Replace every AdaptedLayer by its base module *as it is now* (merged or not) and forget the adapters."""
    for layer_name, layer in list(adapted_layers(model)):
        _set_module(model, layer_name, layer.base)
    for n in list(records(model)):
        _drop(model, n)
    model.__dict__.pop(_RECORDS, None)
    return model


def on_train_step(model: nn.Module, step: int, total_steps: int) -> None:
    """Let every attached adapter react to an optimizer step (call it after ``optimizer.step()``)."""
    for name, config in list(configs(model).items()):
        config.on_step(model, name, step, total_steps)


def regularization_loss(model: nn.Module) -> Any:
    """The sum of the attached adapters' extra loss terms, or None if none has one.

    Training loops add it to the task loss before ``backward()``:
    ``loss = task_loss + reg if (reg := regularization_loss(model)) is not None else task_loss``.
    """
    terms = [t for name, config in configs(model).items() if (t := config.regularization(model, name)) is not None]
    return sum(terms[1:], terms[0]) if terms else None


def _known(model: nn.Module, name: str) -> str:
    if name not in records(model):
        have = ", ".join(repr(n) for n in configs(model)) or "none"
        raise ValueError(f"no adapter named {name!r} is attached (attached: {have})")
    return name


def active_adapters(model: nn.Module) -> tuple[str, ...]:
    """The active adapter names (the union over layers, in attach order)."""
    seen: dict[str, None] = {}
    for _, layer in adapted_layers(model):
        seen.update(dict.fromkeys(layer.active))
    return tuple(n for n in configs(model) if n in seen)


def set_active(model: nn.Module, names: str | Iterable[str], *, trainable: bool = True) -> None:
    """Make ``names`` the active adapters, applied in that order; with ``trainable``, only they train."""
    names = (names,) if isinstance(names, str) else tuple(names)
    for n in names:
        _known(model, n)
    for _, layer in adapted_layers(model):
        layer.active = tuple(n for n in names if n in layer.adapters)
    if trainable:
        mark_trainable(model, names)


@contextlib.contextmanager
def using(model: nn.Module, names: str | Iterable[str]) -> Iterator[nn.Module]:
    """Run with ``names`` active, restoring the previous choice afterwards (even on error)."""
    saved = {id(layer): layer.active for _, layer in adapted_layers(model)}
    try:
        set_active(model, names, trainable=False)
        yield model
    finally:
        for _, layer in adapted_layers(model):
            layer.active = saved.get(id(layer), ())


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the bare base model: no adapter applies inside the block."""
    merged = [(n, layer.merged) for n, layer in adapted_layers(model) if layer.merged]
    if merged:
        raise RuntimeError(
            f"adapters {merged[0][1]} are merged into {merged[0][0]!r}; call unmerge(model) before disabling them"
        )
    with using(model, ()):
        yield model


def mark_trainable(model: nn.Module, names: Iterable[str] | None = None) -> None:
    """Freeze everything, then unfreeze the parameters of adapters ``names`` (default: the active ones)."""
    keep = set(active_adapters(model) if names is None else names)
    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in adapted_layers(model):
        for n in keep & set(layer.adapters.keys()):
            for p in layer.adapters[n].parameters():
                p.requires_grad_(True)
