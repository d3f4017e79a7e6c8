"""The search space of ``deltatune plan``, ``tune`` and ``compare --grid``, assembled from the methods.

Each method declares what is worth varying next to its config (``AdapterConfig.search_space``,
beside ``suggested_lr``): adapter field -> candidate values, the usual choice first. This module
only reads those declarations, so it names no method; it adds the keys every method shares:
the learning rate (a log range around the method's starting value) and the number of epochs.

A :class:`Candidate` is one point: a method and the adapter fields that differ from its
defaults. ``plan`` and ``compare --grid`` use :func:`candidates` (each method's defaults, then
one field changed at a time, so a few rows per method); ``tune`` samples every combination.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from deltatune.methods import METHODS

FULL = "full"
#: ``tune`` samples the learning rate log-uniformly in [lr / LR_FACTOR, lr * LR_FACTOR].
LR_FACTOR = 4.0


def method_space(method: str) -> dict[str, dict[str, Any]]:
    """``{field: {choice name: value}}`` as the method declares it (empty for full fine-tuning)."""
    declared = getattr(METHODS.get(method), "search_space", {}) or {}
    space = {}
    for name, choices in declared.items():
        if isinstance(choices, Mapping):
            space[name] = dict(choices)
        else:
            space[name] = {_name(v): v for v in choices}
    return space


def _name(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


@dataclass(frozen=True)
class Candidate:
    """One method with some adapter fields changed from its defaults (``choices``: field -> choice name)."""

    method: str
    choices: tuple[tuple[str, str], ...] = ()
    # Values beside the names; not compared (two candidates with the same names are the same).
    values: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def label(self) -> str:
        """``lora``, ``lora rank=16``, ``lora rank=16 target=attention-qv``."""
        return " ".join([self.method, *(f"{k}={v}" for k, v in self.choices)])

    @property
    def slug(self) -> str:
        """The label as a directory name: ``lora-rank16``."""
        return "-".join([self.method, *(f"{k.replace('_', '')}{v}" for k, v in self.choices)]).replace("/", "_")

    def apply(self, data: Mapping[str, Any]) -> dict[str, Any]:
        """A config dict (``validate_config``'s input) for this candidate, on top of ``data``."""
        out = {**data, "method": self.method}
        if self.values:
            out["adapter"] = {**dict(data.get("adapter") or {}), **self.values}
        return out


def candidate(method: str, choices: Mapping[str, str] | None = None) -> Candidate:
    """The candidate for ``method`` with the named choices (``{"rank": "16"}``), checked against its space."""
    if method != FULL and method not in METHODS:
        raise ValueError(f"unknown method {method!r}; available: {FULL}, {', '.join(METHODS)}")
    space = method_space(method)
    values, named = {}, []
    for key, choice in (choices or {}).items():
        if key not in space:
            raise ValueError(f"{method} has no search dimension {key!r}; it has: {', '.join(space) or 'none'}")
        if choice not in space[key]:
            raise ValueError(f"{method} {key}: {choice!r} is not a choice; choices: {', '.join(space[key])}")
        values[key] = space[key][choice]
        named.append((key, choice))
    return Candidate(method, tuple(named), values)


def candidates(methods: Sequence[str], variants: str = "all") -> list[Candidate]:
    """Each method at its defaults, then (``variants="all"``) with one field changed at a time."""
    if variants not in ("all", "defaults"):
        raise ValueError(f"variants must be 'all' or 'defaults', got {variants!r}")
    out = []
    for method in methods:
        out.append(candidate(method))
        if variants == "all":
            for key, choices in method_space(method).items():
                for choice in list(choices)[1:]:  # the first is the usual choice: the defaults row
                    out.append(candidate(method, {key: choice}))
    return out


def parse_methods(spec: str | Sequence[str]) -> list[str]:
    """``"all"`` or ``"lora,bitfit"`` -> method names (``full`` included with ``all``)."""
    names = [n.strip() for part in ([spec] if isinstance(spec, str) else spec) for n in part.split(",") if n.strip()]
    known = [FULL, *METHODS]
    if names == ["all"]:
        return known
    if not names:
        raise ValueError("--methods is empty; give e.g. --methods lora,bitfit, or --methods all")
    for name in names:
        if name not in known:
            raise ValueError(f"unknown method {name!r}; available: all, {', '.join(known)}")
    return names


def lr_range(lr: float) -> tuple[float, float]:
    """Where ``tune`` looks for the learning rate, given the method's starting one."""
    return lr / LR_FACTOR, lr * LR_FACTOR
