"""Attach, detach, rename and unwrap adapters, on any ``nn.Module``, by module replacement.

A selected module is wrapped in an :class:`AdaptedLayer` in its parent, and ``detach`` puts the
original object back, so ``state_dict()`` keys are exactly as before. What the model holds per
adapter name is its record (``core/records.py``); which adapters apply and train is
``core/active.py``; what is trainable is counted in ``core/report.py``. Every config has ``parts``
(a single method is a hybrid of one part), so nothing here asks what kind of config it holds.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from deltatune.config import AdapterConfig
from deltatune.core.active import mark_trainable, set_active
from deltatune.core.layer import AdaptedLayer, Composite, FullCopy, logical_get, logical_modules
from deltatune.core.layers import describe, quantized_format
from deltatune.core.records import (
    NAME_RE, AdapterRecord, adapted_layers, drop, drop_all, known, records)
from deltatune.core.report import AttachReport, parameter_report
from deltatune.core.targeting import NoMatchError, modules_for, select


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
    if not isinstance(config, AdapterConfig):
        raise TypeError(_not_a_config(config))
    if not NAME_RE.match(name):
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


def _not_a_config(config: object) -> str:
    """What ``attach`` says when it is handed something other than a method config."""
    if isinstance(config, type) and issubclass(config, AdapterConfig):
        return f"attach takes a config, not the class {config.__name__}: call it, e.g. {config.__name__}()"
    if isinstance(config, Mapping):
        return "attach takes a config, not a dict: build one with deltatune.config_from_dict({'method': ..., ...})"
    return f"attach takes a method config (an AdapterConfig, e.g. from deltatune.METHODS), not {type(config).__name__}"


def _choose(model: nn.Module, name: str, config: AdapterConfig, modules: dict[str, nn.Module],
            part_names: Sequence[Sequence[str]] | None,
            save_names: Iterable[str] | None) -> tuple[list[list[str]], list[str]]:
    """Per part, the modules it adapts, and the modules trained in full; checked against the model."""
    parts = config.parts
    if part_names is None:
        part_names = [modules_for(model, p) for p in parts]
    if save_names is None:
        save_names = (select(model, list(config.modules_to_save), what="modules_to_save").names
                      if config.modules_to_save else [])
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
        # Adapters live where their base lives, in its precision; a base with integer weights only
        # (a 4/8-bit quantized layer without bias) gives its device, and the adapter keeps its dtype.
        params = list(modules[module_name].parameters())
        ref = next((p for p in params if p.is_floating_point()), None)
        if ref is not None:
            adapter.to(device=ref.device, dtype=ref.dtype)
        elif params:
            adapter.to(device=params[0].device)
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
    names = list(records(model)) if name is None else [known(model, name)]
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
        drop(model, n)
    return model


def rename(model: nn.Module, old: str, new: str, layers: list[AdaptedLayer] | None = None) -> None:
    """Give attached adapter ``old`` the name ``new``: its record and its module in every layer
    (it becomes the last attached, as if attached now). Caches built from it are dropped.
    Refused for an adapter with model-level hooks (they may hold the name). ``layers``: the layers
    that hold ``old``, when the caller has them (``core.stored.holding``)."""
    if not NAME_RE.match(new):
        raise ValueError(f"adapter name {new!r} must be an identifier such as 'default' or 'sentiment'")
    if new in records(model):
        raise ValueError(f"an adapter named {new!r} is already attached; detach it first or choose another name")
    gone = records(model)[known(model, old)]
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
    drop_all(model)
    return model


