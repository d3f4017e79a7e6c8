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
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

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


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    """Where the examples come from (built-in tasks fill in their own files).

    For ``task: classification`` give either one ``path`` (split into train/validation/test with
    the seed) or explicit ``train`` / ``validation`` / ``test`` files; CSV or JSONL.
    """

    path: str | None = None
    train: str | None = None
    validation: str | None = None
    test: str | None = None
    text_column: str = "text"
    label_column: str = "label"
    validation_fraction: float = Field(0.1, gt=0, lt=1)
    test_fraction: float = Field(0.1, gt=0, lt=1)
    max_train_examples: int | None = Field(None, ge=1)
    max_eval_examples: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _fractions(self) -> DataConfig:
        if self.validation_fraction + self.test_fraction >= 1:
            raise ValueError("validation_fraction + test_fraction must be below 1 to leave training data")
        return self


class TrainConfig(_Strict):
    """One training run. ``recipes/sentiment-lora.yaml`` explains every key in a comment.

    Defaults here are generic; a task fills the keys a user leaves out with its own tuned values
    (``Task.defaults``, e.g. one epoch for ``sentiment``), and ``adapter:`` with its
    ``method_defaults`` for the chosen method.
    """

    model: str = "all-minilm-l6-v2"
    task: str = "sentiment"
    data: DataConfig = Field(default_factory=DataConfig)
    method: str = "lora"
    adapter: dict[str, Any] = Field(default_factory=dict)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    epochs: int = Field(2, ge=1)
    batch_size: int = Field(32, ge=1)
    eval_batch_size: int = Field(128, ge=1)
    max_length: int = Field(64, ge=2)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.06, ge=0, lt=1)
    grad_clip: float | None = Field(1.0, gt=0)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    seed: int = 0
    checkpoint_every: int = Field(200, ge=1)
    eval_every: int | None = Field(None, ge=1)
    device: str = "auto"
    threads: int | None = Field(None, ge=1)
    # CPU float32 products of LoRA/DoRA layers: onednn (fastest), thin (base output bit-identical), aten
    cpu_engine: Literal["onednn", "thin", "aten"] = "onednn"
    output: str | None = None
    save_format: Literal["deltatune", "peft"] = "deltatune"  # adapter file format; peft: Hugging Face PEFT's
    # Why ``lr`` has its value when the user gave none (``train`` prints it); None: given explicitly.
    _lr_reason: str | None = PrivateAttr(default=None)

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value):
            raise ValueError(f"device must be auto, cpu, cuda[:N] or mps, got {value!r}")
        return value

    @field_validator("output")
    @classmethod
    def _output(cls, value: str | None) -> str | None:
        if value is None:
            return value
        path = Path(value)
        try:
            path.resolve()
        except (RuntimeError, OSError) as err:  # a symlink loop (RuntimeError before Python 3.13)
            raise ValueError(f"output {value!r} cannot be used as a run directory: {err}") from None
        if path.exists() and not path.is_dir():
            raise ValueError(f"output {value!r} is a file, not a directory; choose another --output")
        return value

    @model_validator(mode="before")
    @classmethod
    def _task_defaults(cls, data: Any) -> Any:
        """Fill keys the user left out with the task's tuned defaults (and its method's adapter keys)."""
        from deltatune.train.tasks import TASKS

        if not isinstance(data, dict) or data.get("task", "sentiment") not in TASKS:
            return data
        task = TASKS[data.get("task", "sentiment")]
        data = _merge(task.defaults, data)
        method_defaults = task.method_defaults.get(data.get("method", "lora"))
        if method_defaults:
            data = _merge({"adapter": method_defaults}, data)
        return data

    @model_validator(mode="after")
    def _method_and_task(self) -> TrainConfig:
        from deltatune.train.tasks import TASKS

        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; available: {', '.join(sorted(TASKS))}")
        if self.method == "full":
            if self.adapter:
                raise ValueError("method 'full' trains every weight and takes no adapter settings; remove 'adapter'")
        else:
            self.adapter_config()  # raises ValueError with the method's own message
        TASKS[self.task].check_config(self)
        return self

    def adapter_config(self) -> Any:
        """The method's ``AdapterConfig`` (``None`` for full fine-tuning)."""
        from deltatune import METHODS, config_from_dict

        if self.method == "full":
            return None
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; available: full, {', '.join(sorted(METHODS))}")
        from deltatune.config import ConfigTypeError

        try:
            return config_from_dict({"method": self.method, **self.adapter})
        except ConfigTypeError as err:  # name the key as the user writes it: adapter.rank, not rank
            raise ValueError(f"adapter.{str(err).split(': ', 1)[1]}") from None

    def resolved_output(self) -> Path:
        return Path(self.output) if self.output else Path("runs") / f"{self.task}-{self.method}"


def _merge(defaults: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """``given`` over ``defaults``, mapping by mapping (``--set data.x=1`` keeps the other data defaults)."""
    out = dict(defaults)
    for key, value in given.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merge(out[key], value) if both else value
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
        config = TrainConfig.model_validate(data)
    except ValidationError as err:
        raise ValueError(f"{source}: {_explain(err)}") from None
    config._lr_reason = reason
    return config


def _with_method_defaults(data: Any) -> tuple[Any, str | None]:
    if not isinstance(data, dict) or "lr" in data:
        return data, None
    method = data.get("method", TrainConfig.model_fields["method"].default)
    filled = method_defaults(method) if isinstance(method, str) else {}
    if "lr" in filled:
        reason = "full fine-tuning's default" if method == "full" else f"{method}'s suggested default"
    else:
        from deltatune.train.tasks import TASKS

        task = data.get("task", TrainConfig.model_fields["task"].default)
        has_own = isinstance(task, str) and "lr" in getattr(TASKS.get(task), "defaults", {})
        reason = f"task {task}'s default" if has_own else "the default"
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
