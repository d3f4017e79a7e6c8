"""The training configuration: one YAML file plus ``--set key=value`` overrides, checked up front.

A run is described by :class:`TrainConfig`. Top-level keys are the ones people change most
(``model``, ``task``, ``method``, ``epochs``, ``batch_size``, ``max_length``, ``lr``, ``seed``), so
``--set method=lora --set epochs=1`` reads naturally. The method's own hyperparameters sit under
``adapter:`` and are validated by the method's config class (``deltatune.config_from_dict``), so a
new method works here without touching this file.

Every unknown key and every bad value is a ``ValueError`` before any model or data is loaded.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from deltatune.train.schema import DataConfig, TrainConfig
from deltatune.train.tasks import TASKS

#: Full fine-tuning's settings (as recipes/sentiment-full.yaml: every weight moves, so small steps).
#: Adapter methods bring their own starting learning rate (``AdapterConfig.suggested_lr``), from
#: their papers or measured here. ``train`` and ``compare`` both start from :func:`method_defaults`.
FULL_DEFAULTS: dict[str, Any] = {"lr": 5e-5, "weight_decay": 0.01}


def method_defaults(method: str) -> dict[str, Any]:
    """Training settings a method starts from when the user gives none (its learning rate)."""
    from deltatune.methods import METHODS

    if method == "full":
        return dict(FULL_DEFAULTS)
    lr = getattr(METHODS.get(method), "suggested_lr", None)
    return {} if lr is None else {"lr": lr}


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads ``1e-3`` as a float (YAML 1.1 wants ``1.0e-3``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def _mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    """A mapping that refuses a key given twice (PyYAML would silently keep the last one)."""
    seen: dict[Any, Any] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` keys may be overridden, as YAML says
            continue
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first on line {seen[key].line + 1}); keep one",
                key_node.start_mark)
        seen[key] = key_node.start_mark
    return loader.construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def parse_yaml(text: str, source: str = "YAML") -> Any:
    """Parse ``text`` safely; a syntax error, a duplicate key or an unsafe tag (``!!python/object``)
    is one ``ValueError`` naming ``source`` and the line."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        where = f"{source}, line {mark.line + 1}" if mark is not None and not source.startswith("--set") else source
        problem = getattr(err, "problem", None) or str(err)
        if "could not determine a constructor" in problem:
            problem = f"{problem.split('tag ', 1)[-1]} is not allowed (only plain YAML: no !!python tags)"
        raise ValueError(f"{where}: {problem}") from None


def _with_task_defaults(data: Any) -> Any:
    """Fill keys the user left out with the task's tuned defaults (and its method's adapter keys)."""
    if not isinstance(data, dict) or data.get("task", "sentiment") not in TASKS:
        return data
    task = TASKS[data.get("task", "sentiment")]
    data = merge_settings(task.defaults, data)
    method_defaults = task.method_defaults.get(data.get("method", "lora"))
    if method_defaults:
        data = merge_settings({"adapter": method_defaults}, data)
    return data


def _check_task(config: TrainConfig) -> None:
    if config.task not in TASKS:
        raise ValueError(f"unknown task {config.task!r}; available: {', '.join(sorted(TASKS))}")
    task = TASKS[config.task]
    metric, known = config.early_stopping_metric, task.validation_metrics
    if metric is not None and known and metric not in known:  # before the run, not at its first validation
        raise ValueError(f"early_stopping_metric {metric!r} is not a validation metric of task {config.task!r} "
                         f"(it reports: {', '.join(known)}); set one of those")
    task.check_config(config)


def merge_settings(defaults: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """``given`` over ``defaults``, mapping by mapping (``--set data.x=1`` keeps the other data defaults)."""
    out = dict(defaults)
    for key, value in given.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merge_settings(out[key], value) if both else value
    return out


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one ``key.sub=value`` override in place; the value is read as YAML (``1e-3`` is a float)."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--set expects key=value (e.g. --set epochs=1), got {assignment!r}")
    value = parse_yaml(raw, source=f"--set {assignment}") if raw.strip() else None
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(f"--set {key}: {part!r} is not a mapping")
        node = child
    node[parts[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                output: str | Path | None = None) -> TrainConfig:
    """Read a YAML config (or the defaults), apply overrides, and validate everything.

    ``output`` (``--output``) is taken as it is, not read as YAML: ``runs/a #1`` stays ``runs/a #1``."""
    data: dict[str, Any] = {}
    for assignment in overrides:  # first: `--set epochs 1` makes "1" the config file; say what is wrong
        apply_override({}, assignment)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {path} not found")
        loaded = parse_yaml(path.read_text(), source=str(path))
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(f"{path} must hold a mapping of keys (model:, task:, ...), not {type(loaded).__name__}")
        data = loaded or {}
    for assignment in overrides:
        apply_override(data, assignment)
    if output is not None:
        data["output"] = str(output)
    return validate_config(data, source=str(path) if path else "config")


def validate_config(data: dict[str, Any], source: str = "config") -> TrainConfig:
    """``TrainConfig.model_validate`` with pydantic's errors turned into one clear ``ValueError``.

    Keys the user left out that the method has its own defaults for (``method_defaults``: its
    learning rate) are filled first, so they win over the task's generic ones; explicit keys win
    over both.
    """
    data, reason = _with_method_defaults(data)
    try:
        config = TrainConfig.model_validate(_with_task_defaults(data))
    except ValidationError as err:
        raise ValueError(f"{source}: {_explain(err)}") from None
    try:
        _check_task(config)
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None
    config._lr_reason = reason
    return config


def _with_method_defaults(data: Any) -> tuple[Any, str | None]:
    if not isinstance(data, dict) or "lr" in data:
        return data, None
    method = data.get("method", TrainConfig.model_fields["method"].default)
    filled = method_defaults(method) if isinstance(method, str) else {}
    task_name = data.get("task", TrainConfig.model_fields["task"].default)
    task = TASKS.get(task_name) if isinstance(task_name, str) else None
    task_lr = task.method_lr.get(method) if task is not None and isinstance(method, str) else None
    if task_lr is not None:  # a task's own measured rate for this method wins over the method's generic one
        return {**{k: v for k, v in filled.items() if k not in data}, "lr": task_lr, **data}, \
            f"task {task_name}'s default for {method}"
    if "lr" in filled:
        reason = "full fine-tuning's default" if method == "full" else f"{method}'s suggested default"
    else:
        has_own = task is not None and "lr" in task.defaults
        reason = f"task {task_name}'s default" if has_own else "the default"
    return {**{k: v for k, v in filled.items() if k not in data}, **data}, reason


def lr_note(config: TrainConfig) -> str | None:
    """``"lr 0.01 (bitfit's suggested default; set lr= to change)"``, or None if the user gave ``lr``."""
    reason = config._lr_reason
    return None if reason is None else f"lr {config.lr:g} ({reason}; set lr= to change)"


def _explain(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        parent = TrainConfig if "." not in where else DataConfig
        known = list(parent.model_fields)
        close = difflib.get_close_matches(where.rsplit(".", 1)[-1], known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(known)}"
        return f"unknown key {where!r}{hint}"
    message = str(first["msg"]).removeprefix("Value error, ")
    return f"{where}: {message}" if where else message


def to_yaml(config: TrainConfig) -> str:
    """The resolved config as YAML (what the run actually used, defaults included)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
