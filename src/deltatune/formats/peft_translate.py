"""Applying the PEFT table: deltatune's saved form (meta + tensors) <-> PEFT's config and keys.

No files and no model here, only names, shapes and values; ``peft_format.py`` reads and writes.
The shared PEFT conventions this file encodes:

- tensor keys are ``base_model.model.<module>.<tensor>`` with the adapter name removed
  (``...query.lora_A.weight``); a ``modules_to_save`` module is saved under its own parameter
  names (``base_model.model.classifier.weight``);
- ``target_modules``: a string is a regex that must match the whole module name; a list matches a
  name exactly or as a ``.``-suffix (deltatune's plain names). ``exclude_modules`` likewise;
- a field PEFT's file omits takes PEFT's default, not deltatune's.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from deltatune.formats.peft_methods import PEFT_METHODS
from deltatune.formats.peft_spec import (
    PREFIX,
    Key,
    PeftMethod,
    Site,
    _plain,
    targets_from_peft,
    targets_to_peft,
)

SAVED = "module."  # core's FullCopy holds the trained copy as ``.module``: our key ``<name>.module.<param>``
COMMON = {"peft_type", "peft_version", "auto_mapping", "inference_mode"}  # describe the file, not the adapter
PASSTHROUGH = {"task_type", "base_model_name_or_path", "revision"}        # kept in meta["peft"], written back
Locate = Callable[[Any], list[str]]  # config -> module names, for keys that name no module (needs a model)


# --- targets ---------------------------------------------------------------------------------------


def _peft_match(name: str, spec: str | list[str] | None) -> bool:
    if not spec:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def peft_selects(names: list[str], target: Any, exclude: Any, saved: list[str]) -> list[str]:
    """The modules PEFT would adapt (its matching rules, modules_to_save excluded)."""
    inside = [re.compile(rf"(^|.*\.){re.escape(m)}($|\..*)") for m in saved]
    return [n for n in names if _peft_match(n, target) and not _peft_match(n, exclude)
            and not any(r.match(n) for r in inside)]


def _targeting_to_peft(config: Mapping[str, Any], default: Any, targets: list[str], saved: list[str],
                       names: list[str] | None) -> dict[str, Any]:
    """``target_modules``/``exclude_modules`` that make PEFT adapt exactly ``targets``.

    The user's own patterns are kept when PEFT's rules select the same modules with them (checked
    on the model's module names when there is a model; without one, only plain names are trusted,
    since attach refuses an unsupported module they name). Otherwise the modules are listed by name.
    """
    target = default if config.get("target") is None else config["target"]
    exclude = list(config.get("exclude") or [])
    patterns = [target] if isinstance(target, str) else [] if callable(target) else list(target)
    if patterns and config.get("layers") is None and "all-linear" not in patterns + exclude:
        mine = {"target_modules": targets_to_peft(patterns),
                "exclude_modules": targets_to_peft(exclude) if exclude else None}
        if names is None and all(_plain(p) for p in patterns):
            return mine
        if names is not None and peft_selects(names, mine["target_modules"], mine["exclude_modules"], saved) == targets:
            return mine
    listed: str | list[str] = list(targets)
    if names is not None and peft_selects(names, listed, None, saved) != targets:  # a name is another's suffix
        listed = "|".join(re.escape(t) for t in targets)
    return {"target_modules": listed, "exclude_modules": None}


# --- config ------------------------------------------------------------------------------------------


def entry_for(method: str) -> PeftMethod:
    if method == "hybrid":
        raise ValueError("a hybrid adapter has no PEFT equivalent; save it in deltatune format")
    if method not in PEFT_METHODS:
        raise ValueError(f"method {method!r} has no PEFT equivalent in deltatune yet; save it in deltatune "
                         f"format (PEFT conversion exists for: {', '.join(sorted(PEFT_METHODS))})")
    return PEFT_METHODS[method]


def select_entry(peft: Mapping[str, Any], where: str) -> tuple[str, PeftMethod]:
    """The deltatune method for a PEFT config: its ``peft_type``, then the flags (``use_dora``...)."""
    from deltatune.methods import METHODS

    peft_type = str(peft.get("peft_type", ""))
    found = [(m, e) for m, e in PEFT_METHODS.items() if e.peft_type == peft_type and m in METHODS
             and all(peft.get(f) == v for f, v in e.flags.items())]
    if not found:
        known = sorted({e.peft_type for m, e in PEFT_METHODS.items() if m in METHODS})
        raise ValueError(f"{where}: PEFT method {peft_type!r} is not supported by deltatune "
                         f"(supported PEFT types: {', '.join(known)})")
    return max(found, key=lambda me: len(me[1].flags))


def _check_fields(peft: Mapping[str, Any], method: str, entry: PeftMethod, where: str) -> None:
    """Refuse PEFT features deltatune lacks; warn once about fields this table does not know."""
    for field, allowed in entry.unsupported.items():
        value = peft.get(field, allowed)
        if value != allowed and value not in (None, {}, [], False):
            raise ValueError(f"{where}: PEFT option {field}={value!r} ({entry.peft_type}) is not supported by "
                             f"deltatune's {method!r}; only {field}={allowed!r} can be loaded")
    known = (COMMON | PASSTHROUGH | entry.passthrough | entry.targeting | entry.ignored | set(entry.flags)
             | set(entry.unsupported) | set(entry.writes) | {f.peft for f in entry.fields.values()} | {"modules_to_save"})
    unknown = sorted(k for k, v in peft.items() if k not in known and v not in (None, False, {}, [], ""))
    if unknown:
        warnings.warn(f"{where}: ignoring PEFT config fields deltatune does not know (written by a newer PEFT?): "
                      f"{', '.join(unknown)}", stacklevel=4)


def config_from_peft(peft: Mapping[str, Any], targets: list[str], saved: list[str], module_types: Mapping[str, str],
                     where: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(method, deltatune config dict, fields kept for writing back) for a PEFT config."""
    method, entry = select_entry(peft, where)
    _check_fields(peft, method, entry, where)
    config: dict[str, Any] = {"method": method, "modules_to_save": list(saved)}
    if "target_modules" in entry.targeting:
        target = targets_from_peft(peft.get("target_modules"))
        # PEFT's own default targets depend on the model type: name the modules' leaves instead.
        config["target"] = target if target is not None else tuple(dict.fromkeys(t.rsplit(".", 1)[-1] for t in targets))
    if "exclude_modules" in entry.targeting:
        exclude = peft.get("exclude_modules")
        config["exclude"] = [f"re:{exclude}"] if isinstance(exclude, str) else list(exclude or [])
    if "layers_to_transform" in entry.targeting:
        layers = peft.get("layers_to_transform")
        config["layers"] = [layers] if isinstance(layers, int) else layers
    site = Site(targets, module_types, peft)
    for ours, field in entry.fields.items():
        config[ours] = field.from_peft(peft.get(field.peft, field.default), site)
    kept = {k: peft[k] for k in PASSTHROUGH | entry.passthrough if peft.get(k) is not None}
    if entry.reads_materialized:  # the file holds what the reparameterisation outputs
        from deltatune.methods import METHODS

        config = METHODS[method].from_dict(config).materialized().to_dict()
        method = config["method"]
    return method, config, kept


def check_writable(config: Mapping[str, Any]) -> dict[str, Any]:
    """Refuse an adapter config that PEFT's format cannot hold (a method without a PEFT form, or an
    option PEFT has no field for), so a run can refuse ``save_format: peft`` before it trains.
    Returns the validated config with every field present."""
    from deltatune.methods import METHODS, config_from_dict

    method = config.get("method", "")
    entry = entry_for(method)
    checked = config_from_dict(dict(config)).to_dict()  # validated, every field present
    skip = {"method", "target", "exclude", "layers", "modules_to_save"} | entry.init_only | set(entry.fields)
    for field in dataclasses.fields(METHODS[method]):
        default = field.default_factory() if field.default is dataclasses.MISSING else field.default  # type: ignore[misc]
        default = list(default) if isinstance(default, tuple) else default  # as to_dict writes it
        if field.name not in skip and checked[field.name] != default:
            raise ValueError(f"{method} option {field.name}={checked[field.name]!r} has no PEFT equivalent; "
                             "save in deltatune format")
    return checked


def config_to_peft(meta: Mapping[str, Any], names: list[str] | None = None) -> dict[str, Any]:
    """PEFT's ``adapter_config.json`` for a deltatune meta (``names``: the model's modules, if known)."""
    from deltatune.methods import METHODS

    method = meta["config"].get("method", "")
    entry = entry_for(method)
    config = check_writable(meta["config"])
    cls = METHODS[method]
    peft: dict[str, Any] = {"peft_type": entry.peft_type, **dict(meta.get("peft", {})), **entry.unsupported,
                            **entry.writes, **entry.flags}
    if entry.needs_task and not peft.get("task_type"):
        raise ValueError(f"PEFT applies {entry.peft_type} only with a task_type, which is unknown here: save it "
                         "from the model (save_adapter(model, dir, format='peft'); a classification model must "
                         "keep its head in modules_to_save)")
    targets, saved = list(meta["targets"]), list(meta.get("modules_to_save", []))
    if "target_modules" in entry.targeting:
        found = _targeting_to_peft(config, cls.default_target, targets, saved, names)
        peft.update({k: v for k, v in found.items() if k in entry.targeting})
    if "layers_to_transform" in entry.targeting:
        peft["layers_to_transform"] = None
    peft["modules_to_save"] = saved or None
    site = Site(targets, meta.get("module_types", {}), config)
    for ours, field in entry.fields.items():
        peft[field.peft] = field.to_peft(config[ours], site)
    if "fan_in_fan_out" in entry.passthrough:  # GPT-2's Conv1D stores its weight transposed
        peft["fan_in_fan_out"] = bool(peft.get("fan_in_fan_out")) or "Conv1D" in site.module_types.values()
    peft["inference_mode"] = True
    return peft


# --- tensors -----------------------------------------------------------------------------------------


def split_key(key: str, modules: list[str]) -> tuple[str, str]:
    """``<module>.<tensor>`` -> (module, tensor) for the longest module name that prefixes the key."""
    for m in sorted(modules, key=len, reverse=True):
        if key.startswith(m + "."):
            return m, key[len(m) + 1:]
    raise ValueError(f"tensor {key!r} belongs to none of the adapter's modules")


def peft_key(entry: PeftMethod, site: Site, tensor: str, saved: bool = False) -> tuple[str, Key | None]:
    """PEFT's key (and reshape) for our ``tensor`` of module ``site.module``."""
    if saved:
        return entry.saved_prefix + site.module + "." + tensor.removeprefix(SAVED), None
    if tensor in entry.model_keys:
        return entry.model_keys[tensor], Key(entry.model_keys[tensor])
    table = entry.layout(site.module_type)
    if tensor not in table:
        raise ValueError(f"{entry.peft_type}: no PEFT name for tensor {tensor!r} of {site.module!r} ({site.module_type})")
    return PREFIX + site.module + "." + table[tensor].peft, table[tensor]


def tensors_to_peft(meta: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    from deltatune.methods import config_from_dict

    entry = entry_for(meta["config"]["method"])
    targets, saved = list(meta["targets"]), list(meta.get("modules_to_save", []))
    site = Site(targets, meta.get("module_types", {}), config_from_dict(dict(meta["config"])).to_dict())
    out: dict[str, Tensor] = {}
    for key, t in tensors.items():
        module, tensor = split_key(key, targets + saved)
        here = dataclasses.replace(site, module=module)
        name, spec = peft_key(entry, here, tensor, saved=module in saved)
        out[name] = (spec.to_peft(t, here) if spec else t).contiguous()
    return out


@dataclasses.dataclass
class Plan:
    """How a PEFT file reads as deltatune's: the meta, and per PEFT key our key and reshape."""

    meta: dict[str, Any]
    keys: dict[str, tuple[str, Key | None, Site | None]]  # PEFT key -> (our key, reshape, its site)
    extra: list[str]  # PEFT keys outside modules (PeftMethod.extra_keys)


def _group_keys(entry: PeftMethod, peft: Mapping[str, Any], keys: Iterable[str], where: str
                ) -> tuple[dict[str, dict[str, str]], dict[str, list[str]], list[str], list[str]]:
    """PEFT keys by adapted module ({suffix: key}), by modules_to_save module, extra, and model-level."""
    suffixes = sorted(entry.suffixes(), key=len, reverse=True)
    model_level = set(entry.model_keys.values())
    patterns = tuple(peft.get("modules_to_save") or ())
    by_module: dict[str, dict[str, str]] = {}
    saved: dict[str, list[str]] = {}
    extra: list[str] = []
    model_keys: list[str] = []
    for key in keys:
        if key in entry.extra_keys or key in model_level:
            (extra if key in entry.extra_keys else model_keys).append(key)
            continue
        name = key.removeprefix(PREFIX)
        suffix = next((s for s in suffixes if name.endswith("." + s)), None)
        if suffix is not None and key.startswith(PREFIX):
            by_module.setdefault(name[: -len(suffix) - 1], {})[suffix] = key
            continue
        # PEFT wraps the outermost module whose name ends with a modules_to_save entry.
        parts = key.removeprefix(entry.saved_prefix).split(".")
        module = next((".".join(parts[:i]) for i in range(1, len(parts))
                       if ".".join(parts[:i]).endswith(patterns)), None) if patterns else None
        if module is None or not key.startswith(entry.saved_prefix):
            raise ValueError(f"{where}: tensor {key!r} is not a {entry.peft_type} tensor and belongs to no module "
                             f"in modules_to_save {list(patterns)}")
        saved.setdefault(module, []).append(key)
    return by_module, saved, extra, model_keys


def plan_from_peft(peft: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]], where: str,
                   module_types: Mapping[str, str] | None = None, locate: Locate | None = None) -> Plan:
    """Read a PEFT config and its tensor shapes as deltatune's meta plus a key plan.

    ``module_types`` (from a model) give each module's layer type; without them it is inferred
    from the shapes. Every tensor's shape must come back unchanged through our layout and PEFT's,
    so a tensor laid out for another kind of layer is an error naming its key. ``locate`` (from a
    model) names the module of keys that name none (prompt learning).
    """
    from deltatune._version import __version__
    from deltatune.methods import METHODS

    _, entry = select_entry(peft, where)
    by_module, saved, extra, model_keys = _group_keys(entry, peft, shapes, where)
    types = {m: (module_types or {}).get(m) or entry.infer({s: shapes[k] for s, k in found.items()})
             for m, found in by_module.items()}
    targets = list(by_module)
    method, config, kept = config_from_peft(peft, targets, list(saved), types, where)
    if model_keys:
        if locate is None:
            raise ValueError(f"{where}: a PEFT {entry.peft_type} adapter names no module of its base model; load it "
                             "onto the model with deltatune.load_adapter(model, dir), then save_adapter(model, dir)")
        targets = locate(METHODS[method].from_dict(config))[:1]
    site = Site(targets, types, METHODS[method].from_dict(config).to_dict())
    entry = PEFT_METHODS[method]  # the materialized method's layout, if the file held one
    plan: dict[str, tuple[str, Key | None, Site | None]] = {}
    for key in model_keys:  # the (materialized) method's own tensor: P-tuning's reads as prompt tuning's
        plan[key] = (f"{targets[0]}.{next(iter(entry.model_keys))}", None, None)
    for module, found in by_module.items():
        here = dataclasses.replace(site, module=module)
        reverse = {spec.peft: (tensor, spec) for tensor, spec in entry.layout(here.module_type).items()}
        for suffix, key in found.items():
            if suffix not in reverse:
                raise ValueError(f"{where}: tensor {key!r} does not fit a {entry.peft_type} adapter on a "
                                 f"{here.module_type} layer")
            tensor, spec = reverse[suffix]
            expected = tuple(spec.to_peft(spec.from_peft(torch.empty(shapes[key], device="meta"), here), here).shape)
            if expected != tuple(shapes[key]):
                raise ValueError(f"{where}: tensor {key!r} has shape {tuple(shapes[key])}, but its config makes it "
                                 f"{expected} on a {here.module_type} layer")
            plan[key] = (f"{module}.{tensor}", spec, here)
    for module, keys in saved.items():
        for key in keys:
            plan[key] = (f"{module}.{SAVED}{key.removeprefix(entry.saved_prefix)[len(module) + 1:]}", None, None)
    meta = {"format": "deltatune", "format_version": 1, "deltatune_version": __version__, "adapter_name": "default",
            "config": config, "targets": targets, "modules_to_save": list(saved),
            "module_types": {m: t for m, t in types.items() if t != "*"}, "peft": kept, "converted_from": "peft"}
    return Plan(meta, plan, extra)
