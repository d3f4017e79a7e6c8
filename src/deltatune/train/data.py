"""Reading labelled text, deduplicating it, splitting it with a seed, and batching token ids.

Everything is plain Python lists plus ``torch.Generator``: the data order of every epoch is a pure
function of (seed, epoch), which is what lets ``--resume`` skip exactly the batches already done.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def _decode(raw: bytes, path: Path | str = "the file") -> str:
    # A byte-order mark says the encoding: Excel's "CSV UTF-8" starts with one (without this, the
    # first column was named '\ufefftext'), and "Unicode text" files are UTF-16 or UTF-32.
    for bom, encoding in ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
                          (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"), (codecs.BOM_UTF8, None)):
        if raw.startswith(bom):
            if encoding is None:
                raw = raw[len(bom):]
                break
            try:
                return raw.decode(encoding)
            except UnicodeDecodeError as err:
                raise ValueError(f"{path} starts as {encoding.upper()} but byte {err.start} is not; "
                                 "save it as UTF-8") from None
    # Scraped corpora mix UTF-8 with Windows-1252 bytes; decode line by line so one bad byte
    # does not turn the whole file into replacement characters.
    lines = []
    for line in raw.splitlines(keepends=True):
        try:
            lines.append(line.decode("utf-8"))
        except UnicodeDecodeError:
            lines.append(line.decode("cp1252", errors="replace"))
    return "".join(lines)


LINE_BREAK = re.compile(r"\r\n|\r|\n")  # the only line ends; str.splitlines() also splits on U+2028, \v, \f, ...
JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
TABLE_SUFFIXES = (".csv", ".tsv")


def read_table(path: str | Path, columns: Sequence[str]) -> list[tuple[str, ...]]:
    """Rows of ``columns`` from a CSV/TSV (header row) or JSONL file, as strings.

    ``columns[0]`` is the text: it must be a string (it may be empty: deduplication drops it). The
    other columns are labels: a non-empty string or a number. Anything else is a ``ValueError``
    naming the file and line, so no row becomes the class ``"None"`` or the text ``"None"``.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data file {path} not found")
    if path.suffix.lower() not in JSON_SUFFIXES + TABLE_SUFFIXES:
        raise ValueError(f"{path}: expected a .csv, .tsv or .jsonl file")
    records = numbered_records(path)
    if not records:
        raise ValueError(f"{path} holds no rows")
    missing = [c for c in columns if c not in records[0][1]]
    if missing:
        header = list(records[0][1])
        separator = next((s for s in ";\t|," if len(header) == 1 and s in header[0]), None)
        if separator is not None and path.suffix.lower() in TABLE_SUFFIXES:  # one column: another separator
            raise ValueError(f"{path} reads as one column {header[0]!r}: its fields are separated by {separator!r}; "
                             "save it with commas (.csv) or tabs (.tsv)")
        raise ValueError(
            f"{path} has no column {missing[0]!r} (columns: {', '.join(header)}); "
            "set data.text_column / data.label_column"
        )
    return [tuple(_cell(path, line, record, c, text=i == 0) for i, c in enumerate(columns))
            for line, record in records]


def _cell(path: Path, line: int, record: dict, column: str, text: bool) -> str:
    """One checked value of a row: the text must be a string, a label a non-empty string or a number."""
    value = record.get(column)
    if value is None:
        raise ValueError(f"{path}, line {line}: no {column!r} value; every row needs its {column}")
    if text:
        if not isinstance(value, str):
            raise ValueError(f"{path}, line {line}: {column!r} is {value!r}, not a string")
        return value
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"{path}, line {line}: label {column!r} is {value!r}; use a string or a number")
    if not str(value).strip():
        raise ValueError(f"{path}, line {line}: empty {column!r}; every row needs its {column}")
    return str(value)


def numbered_records(path: Path) -> list[tuple[int, dict]]:
    """(line number, record) for each record of a JSONL, CSV/TSV or .txt file (1-based line numbers).

    Only ``\n``, ``\r\n`` and ``\r`` end a line: a text holding U+2028, U+0085, ``\v``, ``\f`` or
    ``\x1c``-``\x1e`` stays one text, and a quoted CSV field keeps its line break.
    """
    text = _decode(path.read_bytes(), path)
    suffix = path.suffix.lower()
    if suffix in JSON_SUFFIXES:
        return _json_records(path, text)
    if suffix in TABLE_SUFFIXES:
        return _csv_records(path, text, "\t" if suffix == ".tsv" else ",")
    if suffix == ".txt":
        return [(i, {"text": line}) for i, line in enumerate(LINE_BREAK.split(text), 1) if line.strip()]
    raise ValueError(f"{path}: expected a .jsonl, .csv, .tsv or .txt file")


def _json_records(path: Path, text: str) -> list[tuple[int, dict]]:
    records = []
    for i, line in enumerate(LINE_BREAK.split(text), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line, strict=False)  # strict=False: raw control characters stay in the text
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {i}: not JSON ({err.msg}); each line must be one JSON object") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}, line {i}: every line must be a JSON object such as {{\"text\": \"...\"}}")
        records.append((i, record))
    return records


def _csv_records(path: Path, text: str, delimiter: str) -> list[tuple[int, dict]]:
    """Rows as {header: value}; a row with too few or too many fields is an error, not a None."""
    # newline="" hands the csv module the line ends, so a quoted multi-line field keeps its break
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    header: list[str] | None = None
    records = []
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            if "unexpected end of data" in str(err):
                raise ValueError(f"{path}, line {start}: a quote opened here is never closed; "
                                 "close it, or double a quote inside a quoted field (\"\")") from None
            raise ValueError(f"{path}, line {reader.line_num}: {err}") from None
        if not row:
            continue  # a blank line
        if header is None:
            header = row
            twice = next((n for i, n in enumerate(row) if n.strip() and n in row[:i]), None)
            if twice is not None:  # a dict keeps the last one: the other column would be silently ignored
                raise ValueError(f"{path}, line {start}: the header names column {twice!r} twice; rename one")
        elif len(row) != len(header):
            raise ValueError(f"{path}, line {start}: {len(row)} fields but the header has {len(header)} "
                             f"({', '.join(header)}); quote fields that hold a {delimiter!r}")
        else:
            records.append((start, dict(zip(header, row))))
    return records


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
    """Shuffle with ``seed`` and cut into train / validation / test; each part gets at least one item."""
    if validation + test >= 1:
        raise ValueError("validation_fraction + test_fraction must be below 1")
    sizes = _split_sizes(len(items), validation, test)
    if min(sizes) == 0:
        # fractions are > 0 (the config says so), so a large enough n always gives every part one item
        need = next(n for n in range(len(items) + 1, 10**7) if min(_split_sizes(n, validation, test)) > 0)
        raise ValueError(
            f"{len(items):,} distinct examples are too few to split: validation_fraction {validation} and "
            f"test_fraction {test} give train {sizes[0]} / validation {sizes[1]} / test {sizes[2]}; "
            f"give at least {need} distinct examples, or separate data.train / data.validation / data.test files")
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    _, n_val, n_test = sizes
    shuffled = [items[i] for i in order]
    return shuffled[n_val + n_test:], shuffled[:n_val], shuffled[n_val:n_val + n_test]


def _split_sizes(n: int, validation: float, test: float) -> tuple[int, int, int]:
    n_val, n_test = round(n * validation), round(n * test)
    return n - n_val - n_test, n_val, n_test


def check_data_files(data: Any) -> None:
    """The file settings every task shares: one ``data.path`` to split with the seed, or
    ``data.train`` with ``data.validation`` and ``data.test``, never a mix."""
    if data.path and (data.train or data.validation or data.test):
        raise ValueError("give either data.path or data.train/validation/test, not both")
    if data.train and not (data.validation and data.test):
        raise ValueError("with data.train, also give data.validation and data.test")
    if not data.train and (data.validation or data.test):
        raise ValueError("data.validation/test need data.train (or give one data.path to split)")


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
    return [record for _, record in read_numbered_records(path)]


def read_numbered_records(path: str | Path) -> list[tuple[int, dict]]:
    """:func:`read_records` with each record's line number, for errors that name it."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"input file {path} not found")
    return numbered_records(path)


def check_text_field(path: str | Path, records: list[tuple[int, dict]], field: str) -> None:
    """Every numbered record read from ``path`` holds a string ``field`` (else: file and line named)."""
    for line, record in records:
        if field not in record:
            raise ValueError(f"{path}, line {line}: no {field!r} field; every input record needs one")
        _cell(Path(path), line, record, field, text=True)
