"""Reading labelled text, deduplicating it, splitting it with a seed, and batching token ids.

Everything is plain Python lists plus ``torch.Generator``: the data order of every epoch is a pure
function of (seed, epoch), which is what lets ``--resume`` skip exactly the batches already done.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class Splits:
    """Train / validation / test examples. An example is a tuple whose meaning the task decides
    (``(text, label_id)`` for classification, ``(prompt, reply)`` for chat)."""

    train: list[tuple]
    validation: list[tuple]
    test: list[tuple]
    labels: list[str] | None = None  # class names, for classification

    def sizes(self) -> str:
        return f"train {len(self.train):,} / validation {len(self.validation):,} / test {len(self.test):,}"


def _decode(raw: bytes) -> str:
    # Scraped corpora mix UTF-8 with Windows-1252 bytes; decode line by line so one bad byte
    # does not turn the whole file into replacement characters.
    lines = []
    for line in raw.splitlines(keepends=True):
        try:
            lines.append(line.decode("utf-8"))
        except UnicodeDecodeError:
            lines.append(line.decode("cp1252", errors="replace"))
    return "".join(lines)


def read_table(path: str | Path, columns: Sequence[str]) -> list[tuple[str, ...]]:
    """Rows of ``columns`` from a CSV/TSV (header row) or JSONL file, as strings."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data file {path} not found")
    text = _decode(path.read_bytes())
    if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    elif path.suffix.lower() in (".csv", ".tsv"):
        delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
        records = list(csv.DictReader(text.splitlines(), delimiter=delimiter))
    else:
        raise ValueError(f"{path}: expected a .csv, .tsv or .jsonl file")
    if not records:
        raise ValueError(f"{path} holds no rows")
    missing = [c for c in columns if c not in records[0]]
    if missing:
        raise ValueError(
            f"{path} has no column {missing[0]!r} (columns: {', '.join(records[0])}); "
            "set data.text_column / data.label_column"
        )
    return [tuple(str(r[c]) for c in columns) for r in records]


def normalise(text: str) -> str:
    """The key for deduplication: case and whitespace do not make a new example."""
    return " ".join(text.casefold().split())


def dedupe(rows: list[tuple[str, ...]]) -> list[tuple[str, ...]]:
    """Keep the first row of each distinct (normalised) text, so no tweet is in two splits."""
    seen: set[str] = set()
    out = []
    for row in rows:
        key = normalise(row[0])
        if key and key not in seen:
            seen.add(key)
            out.append(row)
    return out


def seeded_split(items: list, seed: int, validation: float, test: float) -> tuple[list, list, list]:
    """Shuffle with ``seed`` and cut into train / validation / test."""
    if validation + test >= 1:
        raise ValueError("validation_fraction + test_fraction must be below 1")
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val, n_test = round(len(items) * validation), round(len(items) * test)
    shuffled = [items[i] for i in order]
    return shuffled[n_val + n_test:], shuffled[:n_val], shuffled[n_val:n_val + n_test]


def take(items: list, limit: int | None) -> list:
    return items if limit is None else items[:limit]


# --- batches of token ids ---------------------------------------------------------------------


def epoch_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int,
                  pool: int = 50) -> list[list[int]]:
    """The batches of one epoch: a pure function of (lengths, seed, epoch).

    Examples are shuffled, then each run of ``pool`` batches' worth is sorted by length before
    it is cut into batches, and the batch order is shuffled again. Batches then hold texts of
    similar length, so little compute goes to padding (about a third less for tweets), while
    every batch still draws from a random part of the data. Only the last batch may be short.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=g).tolist()
    batches = []
    for start in range(0, len(order), batch_size * pool):
        chunk = sorted(order[start:start + batch_size * pool], key=lambda i: lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    # Shuffle the full batches; keep the one short batch (if any) last so every step but one is full.
    full = [b for b in batches if len(b) == batch_size]
    short = [b for b in batches if len(b) < batch_size]
    return [full[i] for i in torch.randperm(len(full), generator=g).tolist()] + short


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Evaluation batches of similar length, so little compute goes to padding."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    for i in range(0, len(order), batch_size):
        yield order[i:i + batch_size]


def pad(rows: Sequence[list[int]], value: int, left: bool = False) -> torch.Tensor:
    """Pad lists of ids to one (B, T) tensor, T = the longest row."""
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            if left:
                out[i, width - len(r):] = torch.tensor(r)
            else:
                out[i, :len(r)] = torch.tensor(r)
    return out


def read_records(path: str | Path) -> list[dict]:
    """Input records for prediction: JSONL objects, CSV rows, or one text per line of a .txt file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"input file {path} not found")
    if path.suffix.lower() == ".txt":
        return [{"text": line} for line in _decode(path.read_bytes()).splitlines() if line.strip()]
    text = _decode(path.read_bytes())
    if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
        if not all(isinstance(r, dict) for r in records):
            raise ValueError(f"{path}: every line must be a JSON object such as {{\"text\": \"...\"}}")
        return records
    if path.suffix.lower() in (".csv", ".tsv"):
        return list(csv.DictReader(text.splitlines(), delimiter="\t" if path.suffix.lower() == ".tsv" else ","))
    raise ValueError(f"{path}: expected a .jsonl, .csv, .tsv or .txt file")
