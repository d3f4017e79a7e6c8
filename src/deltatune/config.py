"""Adapter configuration: what to adapt (targets) and how (the method's own fields).

Every method's config is a frozen dataclass that subclasses :class:`AdapterConfig`. The base class
holds the targeting fields shared by all methods; the subclass adds the method's hyperparameters
and implements :meth:`AdapterConfig.build`, which turns the config into one adapter module for one
base layer. Configs translate, modules compute: modules never see a config.

Configs round-trip through plain dicts (``to_dict`` / ``from_dict``) and reject unknown keys with
a suggestion, so a typo in a YAML file fails before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Literal

from torch import nn

# A target is a module name, a name suffix ("query" matches "encoder.layer.0.attention.self.query"),
# a regular expression written "re:<pattern>" (full match), the keyword "all-linear" or "all-conv", a list of
# those, or a callable ``(name, module) -> bool``.
Target = str | list[str] | tuple[str, ...] | Callable[[str, nn.Module], bool]


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """Fields shared by every method.

    Attributes:
        target: which modules to adapt (see :data:`Target`). ``None`` means the method's default.
        exclude: patterns (same syntax as ``target``) removed from the match.
        layers: only modules inside these block indices of the model's layer stack (e.g. ``[4, 5]``).
        modules_to_save: extra modules trained in full and saved with the adapter (e.g. a new
            classifier head). Matched with the same pattern syntax.
    """

    method: ClassVar[str] = ""

    target: Target | None = None
    exclude: tuple[str, ...] = ()
    layers: tuple[int, ...] | None = None
    modules_to_save: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Every field's value must fit its annotation (rank=int, dropout=float, ...), checked once
        # here for every method, so a wrong-typed value fails on construction, not deep in build().
        hints = _field_hints(type(self))
        for field in dataclasses.fields(self):
            value = _checked(type(self), field.name, hints[field.name], getattr(self, field.name))
            object.__setattr__(self, field.name, value)
        # Normalise lists from YAML/JSON into tuples so configs stay hashable and frozen.
        for name in ("exclude", "modules_to_save"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            object.__setattr__(self, name, tuple(value))
        if isinstance(self.target, list):
            object.__setattr__(self, "target", tuple(self.target))
        if self.layers is not None:
            layers = (self.layers,) if isinstance(self.layers, int) else tuple(self.layers)
            if not all(isinstance(i, int) and i >= 0 for i in layers):
                raise ValueError(f"layers must be non-negative integers, got {self.layers!r}")
            object.__setattr__(self, "layers", layers)
        _check_regexes(self)
        self.validate()

    # --- what a method provides ---------------------------------------------------------------

    default_target: ClassVar[Target] = "all-linear"
    #: Whether a freshly attached adapter leaves the model's outputs unchanged (the conformance
    #: suite checks it). False for methods such as prompt or prefix tuning.
    identity_at_init: ClassVar[bool] = True
    #: Where the method sits in the Delta Tuning taxonomy (Ding et al., 2023): "addition",
    #: "specification" or "reparameterization" (``deltatune compare`` groups its table by it).
    family: ClassVar[str] = "other"
    #: A learning rate to start from when the method needs a different one from LoRA's usual
    #: 1e-3 (``deltatune compare`` uses it unless told otherwise); None: no advice.
    suggested_lr: ClassVar[float | None] = None
    #: What ``deltatune plan``, ``tune`` and ``compare --grid`` try for this method: adapter field ->
    #: its candidate values, the usual choice first, as a tuple of values or a mapping of names to
    #: values (``{"attention-qv": (...)}``, for values too long to show). ``train/space.py`` adds the
    #: keys every method shares (the learning rate around ``suggested_lr``, epochs). Empty: only those.
    search_space: ClassVar[Mapping[str, Any]] = {}
    #: The model-level capability (a Protocol of ``core.contract``, e.g. ``VirtualTokens``) that
    #: ``integrations/`` must serve for this method (see ``core/plumbing.py``); None for methods
    #: that act inside layers only.
    plumbing: ClassVar[Any] = None

    def validate(self) -> None:
        """Check the method's own fields; raise ``ValueError`` naming the fix."""

    def update_rank(self, name: str) -> int | None:
        """The rank of the low-rank update this method puts on module ``name``, for methods whose
        update is factors of ``rank * (d_in + d_out)`` numbers (LoRA-like); ``None`` otherwise.

        ``attach`` warns when it is at or above ``min(d_in, d_out)``: the update is then full rank
        and the adapter stores more numbers than the weight it adapts.
        """
        return None

    def build(self, name: str, base: nn.Module) -> nn.Module | None:
        """Return the adapter for the module called ``name``, or ``None`` if its type is unsupported."""
        raise NotImplementedError

    def select_modules(self, model: nn.Module) -> list[str] | None:
        """Names of the modules to adapt on ``model``, for a method whose choice depends on the whole
        model (e.g. "the last N blocks"); ``None`` (the default): ``attach`` matches ``target`` /
        ``exclude`` / ``layers`` with ``core.targeting.select``."""
        return None

    @property
    def parts(self) -> tuple[AdapterConfig, ...]:
        """The method configs this adapter is made of: ``(self,)`` for a single method, the parts of
        a :class:`HybridConfig`. The engine treats every adapter as a hybrid of its parts."""
        return (self,)

    def on_attach(self, model: nn.Module, name: str) -> list[Any]:
        """Model-level plumbing after the layers are wrapped (e.g. a forward pre-hook for prompt
        tuning). Return removable handles; ``detach`` removes them."""
        return []

    def on_step(self, model: nn.Module, name: str, step: int, total_steps: int) -> None:
        """Called by training loops after each optimizer step (e.g. AdaLoRA's rank schedule)."""

    def regularization(self, model: nn.Module, name: str) -> Any:
        """An extra loss term (a scalar tensor) the training loop adds, or None (e.g. AdaLoRA's
        orthogonality penalty). Collected for all adapters by ``deltatune.regularization_loss``."""
        return None

    # --- serialisation -------------------------------------------------------------------------

    @property
    def resolved_target(self) -> Target:
        return self.default_target if self.target is None else self.target

    def to_dict(self) -> dict[str, Any]:
        if callable(self.target) and not isinstance(self.target, str):
            raise ValueError(
                "a config whose target is a callable cannot be saved; "
                "give the target as names, suffixes or 're:' patterns instead"
            )
        out: dict[str, Any] = {"method": self.method}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, Mapping):
                value = dict(value)
            out[field.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AdapterConfig:
        data = dict(data)
        method = data.pop("method", cls.method)
        if cls.method and method != cls.method:
            raise ValueError(f"config is for method {method!r}, not {cls.method!r}")
        check_keys(data, [f.name for f in dataclasses.fields(cls)], what=f"{cls.__name__}")
        return cls(**data)


class ConfigTypeError(TypeError, ValueError):
    """A config value of the wrong type. A ``TypeError`` for library callers, and a ``ValueError``
    so that the CLI (and pydantic) report it as bad input in one line. ``field`` names the key."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


def _check_regexes(config: AdapterConfig) -> None:
    """Every ``re:`` pattern (target, exclude, modules_to_save, per-module ``*_pattern`` keys) must
    compile: a broken one is an error naming it here, not a ``re.error`` traceback at attach."""
    target = config.target
    found = [("target", t) for t in ((target,) if isinstance(target, str) else target if isinstance(target, tuple) else ())]
    found += [("exclude", p) for p in config.exclude] + [("modules_to_save", p) for p in config.modules_to_save]
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.name.endswith("_pattern") and isinstance(value, Mapping):
            found += [(field.name, key) for key in value]
    for where, pattern in found:
        if isinstance(pattern, str) and pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as err:
                raise ValueError(f"{where} {pattern!r} is not a valid regular expression ({err}); fix it, or drop "
                                 "'re:' to match a module name or its last parts") from None


@functools.cache
def _field_hints(cls: type) -> dict[str, Any]:
    """The fields' annotations, resolved; one that cannot be resolved (a name local to the function
    that defined the config) is not checked rather than breaking the config."""
    try:
        return typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - any failure to resolve means "do not check"
        hints: dict[str, Any] = {}
        for klass in reversed(cls.__mro__):
            for name in getattr(klass, "__annotations__", {}):
                try:
                    hints[name] = typing.get_type_hints(klass).get(name, Any)
                except Exception:  # noqa: BLE001
                    hints[name] = Any
        return hints


def _checked(cls: type, name: str, hint: Any, value: Any) -> Any:
    """``value`` if it fits ``hint`` (a ``tuple[T, ...]`` field also takes a list or one T, returned
    as a tuple); otherwise a :class:`ConfigTypeError` saying what the field takes."""
    ok, normalised = _fits(hint, value)
    if ok:
        return normalised
    method = getattr(cls, "method", "") or cls.__name__
    raise ConfigTypeError(f"{method}: {name} must be {_describe(hint)}, got {value!r} ({type(value).__name__})",
                          field=name)


def _fits(hint: Any, value: Any) -> tuple[bool, Any]:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True, value
    if hint is type(None):
        return value is None, value
    if origin in (typing.Union, types.UnionType):
        for option in args:
            ok, normalised = _fits(option, value)
            if ok:
                return True, normalised
        return False, value
    if origin is Literal:
        return value in args and all(type(value) is type(a) for a in args if a == value), value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:  # an int is a fine float (alpha: 16)
        return isinstance(value, (int, float)) and not isinstance(value, bool), value
    if origin in (tuple, list):
        elem = args[0] if args else Any
        if isinstance(value, (list, tuple)):
            items = [_fits(elem, v) for v in value]
            return all(ok for ok, _ in items), tuple(v for _, v in items)
        if args and len(args) == 2 and args[1] is Ellipsis:  # one item stands for a one-item tuple
            ok, item = _fits(elem, value)
            return ok, (item,)
        return False, value
    if origin in (dict, Mapping) or hint in (dict, Mapping):
        if not isinstance(value, Mapping):
            return False, value
        key_t, val_t = args if len(args) == 2 else (Any, Any)
        return all(_fits(key_t, k)[0] and _fits(val_t, v)[0] for k, v in value.items()), value
    if origin is Callable or hint is Callable:
        return callable(value) and not isinstance(value, (str, bytes)), value
    if isinstance(hint, type):
        return isinstance(value, hint), value
    return True, value  # an annotation we do not check


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(dict.fromkeys(_describe(a) for a in args))
    if origin is Literal:
        return " or ".join(map(repr, args)) if len(args) <= 2 else "one of " + ", ".join(map(repr, args))
    if origin in (tuple, list):
        plural = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}
        return f"a list of {plural.get(args[0], _describe(args[0])) if args else 'values'}"
    if origin in (dict, Mapping):
        return f"a mapping of {_describe(args[0])} to {_describe(args[1])}" if len(args) == 2 else "a mapping"
    if origin is Callable or hint is Callable:
        return "a callable"
    named = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "None"}
    return named.get(hint, getattr(hint, "__name__", str(hint)))


def check_keys(data: Mapping[str, Any], known: list[str], what: str) -> None:
    """Raise ``ValueError`` for the first unknown key, suggesting the closest known one."""
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(sorted(known))}"
            raise ValueError(f"unknown key {key!r} for {what}{hint}")


@dataclasses.dataclass(frozen=True)
class HybridConfig(AdapterConfig):
    """Several methods under one adapter name, e.g. low-rank updates on attention, a bottleneck
    after the feed-forward block and bias deltas everywhere. Each part keeps its own targets;
    where parts meet on one module they apply in the order given (first innermost). The adapter
    trains, saves, loads, merges and switches as one. ``modules_to_save`` belongs to the hybrid.

    ``parts`` is the one field that makes a hybrid: every config has ``parts`` (a single method's
    is ``(self,)``), so the engine never asks whether a config is a hybrid. Parsing a hybrid from
    a dict needs the method registry and lives in ``deltatune.methods.config_from_dict``.
    """

    method: ClassVar[str] = "hybrid"

    parts: tuple[AdapterConfig, ...] = ()

    def validate(self) -> None:
        if not self.parts:
            raise ValueError("a hybrid needs at least one part, e.g. parts=[LoraConfig(...), ...]")
        for part in self.parts:
            if not isinstance(part, AdapterConfig) or part.parts != (part,):  # a part is one method
                raise ValueError(f"hybrid parts must be method configs (not hybrids), got {type(part).__name__}"
                                 " (build a hybrid from a dict with deltatune.config_from_dict)")
            if part.modules_to_save:
                raise ValueError("give modules_to_save on the hybrid, not on one of its parts")
        if self.target is not None or self.exclude or self.layers is not None:
            raise ValueError("a hybrid has no target of its own: set target, exclude and layers on its parts")
        object.__setattr__(self, "parts", tuple(self.parts))

    def on_attach(self, model: nn.Module, name: str) -> list[Any]:
        return [h for part in self.parts for h in part.on_attach(model, name)]

    def on_step(self, model: nn.Module, name: str, step: int, total_steps: int) -> None:
        for part in self.parts:
            part.on_step(model, name, step, total_steps)

    def regularization(self, model: nn.Module, name: str) -> Any:
        terms = [t for part in self.parts if (t := part.regularization(model, name)) is not None]
        return sum(terms[1:], terms[0]) if terms else None

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "parts": [p.to_dict() for p in self.parts],
                "modules_to_save": list(self.modules_to_save)}
