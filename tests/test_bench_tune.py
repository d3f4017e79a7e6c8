"""``bench.tune_unseen``'s data: chatterbot-corpus utterances labelled with their category, built at run
time into CSV files outside the repository; no text in two splits, every evaluated label trained."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest

if importlib.util.find_spec("chatterbot_corpus") is None:
    pytest.skip("needs chatterbot-corpus", allow_module_level=True)

from bench.tune_unseen import build  # noqa: E402


def _rows(path: str) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_split_is_disjoint_seeded_and_covers_the_labels(tmp_path: Path) -> None:
    data = build(tmp_path / "a", seed=0)
    rows = {split: _rows(path) for split, path in data["files"].items()}
    texts = {split: {" ".join(r["text"].casefold().split()) for r in items} for split, items in rows.items()}
    assert not texts["train"] & texts["test"] and not texts["train"] & texts["validation"]
    assert not texts["validation"] & texts["test"]
    labels = {split: {r["label"] for r in items} for split, items in rows.items()}
    assert len(labels["train"]) == data["labels"] == 21  # one label per YAML file
    assert labels["validation"] <= labels["train"] and labels["test"] <= labels["train"]
    assert data["sizes"]["test"] > 400 and data["sizes"]["train"] > 1000
    again = build(tmp_path / "b", seed=0)
    assert Path(again["files"]["test"]).read_text() == Path(data["files"]["test"]).read_text()
    other = build(tmp_path / "c", seed=1)
    assert Path(other["files"]["test"]).read_text() != Path(data["files"]["test"]).read_text()
