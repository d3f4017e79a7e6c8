"""Resource budgets: ``--budget memory=4GB,time=10m,adapter=5MB,params=1%``.

- ``memory``: peak training memory (what ``metrics.json``'s ``peak_memory_mb`` measures);
- ``time``: training time of the whole run (all epochs; ``train_seconds``);
- ``adapter``: bytes of the saved result (``adapter_bytes``);
- ``params``: trainable parameters, a count (``2M``, ``500k``, ``12000``) or a share of the model (``1%``).

Sizes take B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024); times take
s, m (min) or h; a bare number is bytes or seconds. A budget that does not parse is one
``ValueError`` naming the part and what it should look like.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Any

SIZE_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "k": 1e3, "m": 1e6, "g": 1e9,
              "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
TIME_UNITS = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600}
COUNT_UNITS = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9}
KEYS = ("memory", "time", "adapter", "params")
_NUMBER = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z%]*)\s*")


@dataclass(frozen=True)
class Budget:
    """Limits; ``None`` means no limit. ``params_share`` is a fraction (0.01 for ``1%``)."""

    memory_bytes: float | None = None
    seconds: float | None = None
    adapter_bytes: float | None = None
    params: float | None = None
    params_share: float | None = None
    text: str = ""

    def __bool__(self) -> bool:
        return any(v is not None for v in (self.memory_bytes, self.seconds, self.adapter_bytes, self.params,
                                          self.params_share))

    def loads(self, row: dict[str, Any]) -> dict[str, float]:
        """Each limited resource's share of its limit for a predicted ``row`` (1.0 = exactly at the limit)."""
        out = {}
        if self.memory_bytes is not None and row.get("peak_memory_mb") is not None:
            out["memory"] = row["peak_memory_mb"] * 2**20 / self.memory_bytes
        if self.seconds is not None and row.get("train_seconds") is not None:
            out["time"] = row["train_seconds"] / self.seconds
        if self.adapter_bytes is not None and row.get("adapter_bytes") is not None:
            out["adapter"] = row["adapter_bytes"] / self.adapter_bytes
        if self.params is not None and row.get("trainable_parameters") is not None:
            out["params"] = row["trainable_parameters"] / self.params
        if self.params_share is not None and row.get("trainable_share") is not None:
            out["params"] = row["trainable_share"] / self.params_share
        return out

    def over(self, row: dict[str, Any]) -> list[str]:
        """The resources ``row`` is predicted to exceed (``["memory", "time"]``), in budget order."""
        return [k for k, v in self.loads(row).items() if v > 1.0]

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "memory_bytes": self.memory_bytes, "seconds": self.seconds,
                "adapter_bytes": self.adapter_bytes, "params": self.params, "params_share": self.params_share}


UNIT_NAMES = {id(SIZE_UNITS): "B, KB, MB, GB, TB, KiB, MiB, GiB, TiB", id(TIME_UNITS): "s, m, h",
              id(COUNT_UNITS): "k, M, B, or a share such as 1%"}


def _number(part: str, value: str, units: dict[str, float], example: str) -> float:
    m = _NUMBER.fullmatch(value)
    unit = m.group(2).lower() if m else None
    if m is None or unit not in units:
        names = UNIT_NAMES.get(id(units), "none")
        raise ValueError(f"budget {part!r}: {value!r} is not understood; write e.g. {example} (units: {names})")
    return float(m.group(1)) * units[unit]


def parse_budget(text: str | None) -> Budget:
    """``"memory=4GB,time=10m"`` -> :class:`Budget` (an empty or ``None`` text: no limits)."""
    if text is None or not text.strip():
        return Budget()
    fields: dict[str, Any] = {"text": text.strip()}
    seen: set[str] = set()
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        key, eq, value = (s.strip() for s in part.partition("="))
        if not eq or not value:
            raise ValueError(f"budget {part!r}: expected key=value, e.g. memory=4GB,time=10m,adapter=5MB,params=1%")
        if key not in KEYS:
            close = difflib.get_close_matches(key, KEYS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; keys: {', '.join(KEYS)}"
            raise ValueError(f"budget {part!r}: unknown key {key!r}{hint}")
        if key in seen:
            raise ValueError(f"budget {text!r}: {key!r} is given twice; keep one")
        seen.add(key)
        if key == "memory":
            fields["memory_bytes"] = _number(part, value, SIZE_UNITS, "memory=4GB")
        elif key == "adapter":
            fields["adapter_bytes"] = _number(part, value, SIZE_UNITS, "adapter=5MB")
        elif key == "time":
            fields["seconds"] = _number(part, value, TIME_UNITS, "time=10m")
        elif value.endswith("%"):
            share = _number(part, value[:-1], {"": 1}, "params=1%") / 100
            if not 0 < share <= 1:
                raise ValueError(f"budget {part!r}: a share of parameters must be above 0% and at most 100%")
            fields["params_share"] = share
        else:
            fields["params"] = _number(part, value, COUNT_UNITS, "params=2M or params=1%")
    budget = Budget(**fields)
    for name in ("memory_bytes", "seconds", "adapter_bytes", "params"):
        if getattr(budget, name) == 0:
            raise ValueError(f"budget {text!r}: a limit of 0 leaves nothing to run; raise it or leave it out")
    return budget


def format_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"


def format_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    if s >= 3600:
        return f"{s / 3600:.2g} h"
    if s >= 60:
        return f"{s / 60:.2g} min"
    return f"{s:.2g} s"
