"""The vocabulary of the PEFT translation table: what one method's entry says, and pattern syntax.

An entry (:class:`PeftMethod`) describes how one deltatune method reads and writes as one Hugging
Face PEFT method: config fields (:class:`Field`), tensor names and layouts (:class:`Key`), and the
few PEFT conventions that vary by method. The entries live in ``peft_methods.py`` and
``peft_prompt.py``; the code that applies them in ``peft_translate.py``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

Meta = dict[str, Any]
Tensors = dict[str, Tensor]
PREFIX = "base_model.model."  # PEFT's key prefix for tensors inside the base model


@dataclass(frozen=True)
class Site:
    """Context of one translation: the adapted modules, their layer types, the config being read
    (deltatune's when writing PEFT, PEFT's when reading it) and, for a tensor, its module."""

    targets: list[str]
    module_types: Mapping[str, str]
    config: Mapping[str, Any]
    module: str = ""

    @property
    def module_type(self) -> str:
        return self.module_types.get(self.module, "*")


def same(value: Any, site: Site | None = None) -> Any:
    return value


def cast(kind: Callable[[Any], Any]) -> Callable[[Any, Site], Any]:
    return lambda value, site: value if value is None else kind(value)


@dataclass(frozen=True)
class Field:
    """A config field: PEFT's name, PEFT's default (for files that omit it), translations each way."""

    peft: str
    default: Any
    to_peft: Callable[[Any, Site], Any] = same
    from_peft: Callable[[Any, Site], Any] = same


@dataclass(frozen=True)
class Key:
    """A tensor: PEFT's key suffix, and reshapes where PEFT's layout differs from ours."""

    peft: str
    to_peft: Callable[[Tensor, Site], Tensor] = same
    from_peft: Callable[[Tensor, Site], Tensor] = same


TARGETING = frozenset({"target_modules", "exclude_modules", "layers_to_transform", "layers_pattern"})


@dataclass(frozen=True)
class PeftMethod:
    """How one deltatune method reads and writes as one PEFT method.

    Attributes:
        peft_type: PEFT's ``peft_type``.
        fields: our config field -> :class:`Field`, for every field beyond the targeting ones
            (except ``init_only``).
        tensors: base module type (``"*"``: any other) -> our tensor key -> PEFT key suffix.
        infer: {PEFT suffix: shape} of one module -> its module type (a key of ``tensors``), for
            files read without a model.
        targeting: the PEFT targeting fields the method has.
        flags: PEFT fields that pick this entry among those of one ``peft_type`` (``use_dora``).
        unsupported: PEFT fields deltatune has no equivalent for, with the only value it loads
            (PEFT's default). Written on save, like ``flags``.
        writes: PEFT fields written with a fixed value on save, whatever a file read had.
        ignored: PEFT fields that do not change a trained adapter (initialisation, runtime).
        passthrough: PEFT fields kept as they are through a conversion (``fan_in_fan_out``...).
        init_only: our fields that only shape initialisation and have no PEFT form: not written.
        extra_keys: PEFT keys outside any module (VeRA's shared projection), checked by ``check``.
        check: validates a file's extra tensors against its config; raises ``ValueError``.
        model_keys: our tensor key -> PEFT key that names no module (prompt learning's
            ``prompt_embeddings``); reading needs the model to find the module (``select_modules``).
        saved_prefix: PEFT's prefix of ``modules_to_save`` keys.
        needs_task: PEFT needs ``task_type`` to apply the adapter at all (prompt learning).
        reads_materialized: the file holds what the method's reparameterisation outputs; it reads
            as the config's ``materialized()`` form (P-tuning as prompt tuning).
        export: adjusts meta and tensors before writing, when PEFT's form differs (PiSSA, P-tuning).
    """

    peft_type: str
    fields: Mapping[str, Field]
    tensors: Mapping[str, Mapping[str, Key | str]]
    infer: Callable[[Mapping[str, tuple[int, ...]]], str] = lambda shapes: "*"
    targeting: frozenset[str] = TARGETING
    flags: Mapping[str, Any] = field(default_factory=dict)
    unsupported: Mapping[str, Any] = field(default_factory=dict)
    writes: Mapping[str, Any] = field(default_factory=dict)
    ignored: frozenset[str] = frozenset()
    passthrough: frozenset[str] = frozenset()
    init_only: frozenset[str] = frozenset()
    extra_keys: frozenset[str] = frozenset()
    check: Callable[[Mapping[str, Any], Tensors], None] | None = None
    model_keys: Mapping[str, str] = field(default_factory=dict)
    saved_prefix: str = PREFIX
    needs_task: bool = False
    reads_materialized: bool = False
    export: Callable[[Meta, Tensors], tuple[Meta, Tensors]] | None = None

    def layout(self, module_type: str) -> dict[str, Key]:
        table = self.tensors.get(module_type, self.tensors["*"])
        return {ours: k if isinstance(k, Key) else Key(k) for ours, k in table.items()}

    def suffixes(self) -> set[str]:
        return {k.peft for t in self.tensors for k in self.layout(t).values()}


# --- pattern dictionaries (rank_pattern, alpha_pattern) ----------------------------------------------

_SUFFIX_RE = r"re:(?:.*\.)?(?:"


def _compiles(regex: str) -> bool:
    try:
        re.compile(regex)
    except re.error:
        return False
    return True


def pattern_to_peft(p: str) -> str:
    """A ``rank_pattern`` key. PEFT matches it as ``(.*\\.)?(key)$``: a plain name is escaped, and
    ``re:X`` becomes ``^(?:X)$``, which can only match from the start, i.e. a full match of X."""
    if not p.startswith("re:"):
        return re.escape(p)
    inner = p[len(_SUFFIX_RE):-1]
    if p.startswith(_SUFFIX_RE) and p.endswith(")") and _compiles(inner):
        return inner  # the form pattern_from_peft gives a PEFT key: give the key back
    return f"^(?:{p[3:]})$"


def pattern_from_peft(k: str) -> str:
    inner = k[4:-2]
    if k.startswith("^(?:") and k.endswith(")$") and _compiles(inner):
        return "re:" + inner
    plain = re.sub(r"\\(.)", r"\1", k)
    return plain if re.escape(plain) == k else rf"re:(?:.*\.)?(?:{k})"


def patterns(kind: Callable[[Any], Any]) -> tuple[Callable, Callable]:
    """Translations of a ``{pattern: value}`` field."""
    return (lambda d, site: {pattern_to_peft(k): kind(v) for k, v in d.items()},
            lambda d, site: {pattern_from_peft(k): kind(v) for k, v in (d or {}).items()})


# --- target patterns (here, the lowest PEFT module, so the table and the translator both import it) ---


def _plain(p: str) -> bool:
    return not p.startswith("re:") and p != "all-linear"


def _regex(p: str) -> str:
    """A deltatune pattern as a regex that must match the whole module name."""
    return p[3:] if p.startswith("re:") else r"(?:.*\.)?" + re.escape(p)


def targets_to_peft(patterns: Iterable[str]) -> str | list[str]:
    """Plain names stay a list (PEFT's suffix match); anything else becomes one full-match regex."""
    patterns = list(patterns)
    if all(_plain(p) for p in patterns):
        return patterns
    return _regex(patterns[0]) if len(patterns) == 1 else "|".join(f"(?:{_regex(p)})" for p in patterns)


def targets_from_peft(value: str | list[str] | None) -> tuple[str, ...] | str | None:
    if value is None or value == "all-linear":
        return value
    return f"re:{value}" if isinstance(value, str) else tuple(value)
