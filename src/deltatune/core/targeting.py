"""Which modules an adapter attaches to. This file holds the only name-matching logic.

Pattern syntax (used for ``target``, ``exclude``, ``modules_to_save`` and per-module overrides):

- ``"encoder.layer.0.attention.self.query"``: an exact module name;
- ``"query"`` or ``"attention.self.query"``: a suffix on a ``.`` boundary;
- ``"re:.*\\.(query|value)"``: a regular expression that must match the whole name;
- ``"all-linear"``: every linear layer except the output head;
- ``"all-conv"``: every convolution (``nn.Conv1d/2d/3d``, grouped and depthwise ones included);
- a list of the above (any may match), or a callable ``(name, module) -> bool``.

Layer indices (``layers=[4, 5]``) are read structurally: the index of the module's ancestor
inside the model's largest ``nn.ModuleList`` (its stack of blocks), not from substrings.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from torch import nn

from deltatune.config import AdapterConfig, Target
from deltatune.core.layer import AdaptedLayer, logical_modules
from deltatune.core.layers import describe

T = TypeVar("T")

ALL_LINEAR = "all-linear"
ALL_CONV = "all-conv"


class NoMatchError(ValueError):
    """A target selected no module a method can adapt (the message shows real module names)."""


def _linear_like(module: nn.Module) -> bool:
    # Linear layers, transposed ones (transformers' GPT-2 ``Conv1D``) included.
    spec = describe(module)
    return spec is not None and spec.kind == "linear"


def name_matches(name: str, pattern: str) -> bool:
    """True if one pattern (exact, suffix or ``re:``) matches a module name."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


def any_matches(name: str, patterns: Iterable[str]) -> bool:
    return any(name_matches(name, p) for p in patterns)


def pattern_value(name: str, patterns: Mapping[str, T], default: T) -> T:
    """The value of the first pattern in ``patterns`` that matches module ``name``, else ``default``
    (per-module overrides such as ``rank_pattern={"query": 16}``; same syntax as ``target``)."""
    return next((v for p, v in patterns.items() if name_matches(name, p)), default)


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the output head: the module that produces logits, kept out of ``all-linear``."""
    names: set[str] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            head = get_out()
        except (NotImplementedError, AttributeError):
            head = None
        if isinstance(head, AdaptedLayer):
            head = head.base
        if head is not None:
            names |= {n for n, m in logical_modules(model) if m is head}
    linears = [n for n, m in logical_modules(model) if _linear_like(m)]
    for n in linears:
        leaf = n.rsplit(".", 1)[-1]
        if leaf in {"lm_head", "classifier", "score", "head", "cls"}:
            names.add(n)
    if not names and len(linears) > 1 and not hasattr(model, "config"):
        # A plain network (not a transformers model): its last linear layer is its output head.
        names.add(linears[-1])
    return names


def block_index(model: nn.Module) -> dict[str, int]:
    """Map each module name inside the main block stack to its block index."""
    lists = [(n, m) for n, m in logical_modules(model) if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        return {}
    # The block stack is the ModuleList with the most parameters (e.g. encoder.layer, model.layers).
    stack_name, _ = max(lists, key=lambda nm: sum(p.numel() for p in nm[1].parameters()))
    prefix = stack_name + "." if stack_name else ""
    out: dict[str, int] = {}
    for n, _ in logical_modules(model):
        if n.startswith(prefix) and n != stack_name:
            head = n[len(prefix):].split(".", 1)[0]
            if head.isdigit():
                out[n] = int(head)
    return out


@dataclass
class Selection:
    """What a target spec matched, for reports and errors."""

    names: list[str]
    considered: int
    examples: list[str] = field(default_factory=list)


def _examples(model: nn.Module, limit: int = 4) -> list[str]:
    leaves = [n for n, m in logical_modules(model) if n and next(m.children(), None) is None
              and any(True for _ in m.parameters(recurse=False))]
    # Prefer names from the middle of the model: they show the naming scheme best.
    step = max(1, len(leaves) // (limit + 1))
    return leaves[step::step][:limit] or leaves[:limit]


def select(
    model: nn.Module,
    target: Target,
    exclude: Iterable[str] = (),
    layers: Iterable[int] | None = None,
    what: str = "target",
) -> Selection:
    """Return the names of the modules ``target`` selects, in model order.

    Raises ``ValueError`` when nothing matches, showing real module names so the fix is obvious
    (``what``: the setting the patterns came from, as the message names it).
    Adapters already attached are invisible: an adapted layer is seen as its base module.
    """
    named = [(n, m) for n, m in logical_modules(model) if n]
    exclude = tuple(exclude)
    layer_set = set(layers) if layers is not None else None
    blocks = block_index(model) if layer_set is not None else {}
    heads = output_head_names(model) if target == ALL_LINEAR else set()

    def wanted(name: str, module: nn.Module) -> bool:
        if callable(target) and not isinstance(target, str):
            return bool(target(name, module))
        if target == ALL_LINEAR:
            return _linear_like(module) and name not in heads
        if target == ALL_CONV:
            spec = describe(module)
            return spec is not None and spec.kind == "conv" and not spec.transposed
        patterns = (target,) if isinstance(target, str) else tuple(target)
        return any_matches(name, patterns)

    names = []
    for name, module in named:
        if not wanted(name, module) or any_matches(name, exclude):
            continue
        if layer_set is not None and blocks.get(name) not in layer_set:
            continue
        names.append(name)
    if not names:
        if isinstance(target, str):
            shown = repr(target)
        elif callable(target):
            shown = getattr(target, "__name__", "callable")
        else:  # a list or tuple of patterns: shown as the list the user wrote, not a tuple's repr
            shown = repr(list(target))
        detail = ""
        if layer_set is not None:
            n_blocks = len(set(blocks.values()))
            detail = f" in layers {sorted(layer_set)} (the model has {n_blocks} blocks)"
        examples = ", ".join(repr(e) for e in _examples(model))
        raise NoMatchError(
            f"{what} {shown} matched 0 of {len(named)} modules{detail}; names look like {examples}"
        )
    return Selection(names=names, considered=len(named), examples=_examples(model))


def modules_for(model: nn.Module, config: AdapterConfig) -> list[str]:
    """The modules ``config`` (one method config) adapts on ``model``: the method's own choice when
    it makes one (``select_modules``), otherwise its ``target`` / ``exclude`` / ``layers`` matched
    by :func:`select`. The default lives here, so that ``config.py`` imports nothing of the engine."""
    names = config.select_modules(model)
    if names is None:
        names = select(model, config.resolved_target, config.exclude, config.layers).names
    return list(names)
