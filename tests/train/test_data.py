"""Reading, deduplicating and splitting data; batching that makes resume exact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from deltatune.train import data as D
from deltatune.train.config import load_config
from deltatune.train.tasks import get_task


def test_dedupe_before_split_keeps_every_text_in_one_split() -> None:
    rows = [(f"text {i % 40}", "a") for i in range(100)] + [("TEXT  3", "b"), (" text 4 ", "a")]
    unique = D.dedupe(rows)
    assert len(unique) == 40 and unique[3] == ("text 3", "a")  # first occurrence wins
    train, val, test = D.seeded_split(unique, seed=0, validation=0.2, test=0.2)
    keys = [{D.normalise(t) for t, _ in split} for split in (train, val, test)]
    assert len(keys[1]) == 8 and len(keys[2]) == 8 and len(keys[0]) == 24
    assert not (keys[0] & keys[1]) and not (keys[0] & keys[2]) and not (keys[1] & keys[2])


def test_split_is_seeded() -> None:
    items = list(range(50))
    assert D.seeded_split(items, 1, 0.1, 0.1) == D.seeded_split(items, 1, 0.1, 0.1)
    assert D.seeded_split(items, 1, 0.1, 0.1) != D.seeded_split(items, 2, 0.1, 0.1)
    train, val, test = D.seeded_split(items, 1, 0.1, 0.1)
    assert sorted(train + val + test) == items


def test_epoch_batches_are_a_function_of_seed_and_epoch() -> None:
    lengths = [1, 5, 2, 9, 3, 3, 7, 1, 4, 6]
    a = D.epoch_batches(lengths, 3, seed=0, epoch=1)
    assert a == D.epoch_batches(lengths, 3, seed=0, epoch=1)
    assert a != D.epoch_batches(lengths, 3, seed=0, epoch=2)
    assert sorted(i for b in a for i in b) == list(range(10)) and [len(b) for b in a] == [3, 3, 3, 1]


def test_epoch_batches_group_similar_lengths() -> None:
    lengths = torch.randint(1, 60, (3200,), generator=torch.Generator().manual_seed(0)).tolist()
    batches = D.epoch_batches(lengths, 32, seed=0, epoch=0)
    padded = sum(32 * max(lengths[i] for i in b) for b in batches)
    assert padded < 1.1 * sum(lengths)  # random batches of 32 would pad to about 1.9x
    assert sorted(i for b in batches for i in b) == list(range(3200))


def test_pad() -> None:
    assert D.pad([[1, 2, 3], [4]], 0).tolist() == [[1, 2, 3], [4, 0, 0]]
    assert D.pad([[1, 2, 3], [4]], 0, left=True).tolist() == [[1, 2, 3], [0, 0, 4]]


def test_read_csv_jsonl_and_mixed_encodings(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_bytes(b"text,label\ncaf\xc3\xa9 ok,x\ncaf\xe9 bad,y\n")  # UTF-8 then cp1252
    assert D.read_table(tmp_path / "a.csv", ["text", "label"]) == [("café ok", "x"), ("café bad", "y")]
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "hi", "label": 1}) + "\n\n")
    assert D.read_table(tmp_path / "b.jsonl", ["text", "label"]) == [("hi", "1")]
    with pytest.raises(ValueError, match="no column 'sentence'.*data.text_column"):
        D.read_table(tmp_path / "a.csv", ["sentence", "label"])
    with pytest.raises(ValueError, match="expected a .csv"):
        (tmp_path / "c.parquet").write_text("x")
        D.read_table(tmp_path / "c.parquet", ["text"])


def test_read_records_for_prediction(tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_text("one\n\ntwo\n")
    assert D.read_records(tmp_path / "in.txt") == [{"text": "one"}, {"text": "two"}]
    (tmp_path / "in.jsonl").write_text('[1, 2]\n')
    with pytest.raises(ValueError, match="JSON object"):
        D.read_records(tmp_path / "in.jsonl")


def test_sentiment_task_dedupes_the_corpus_before_splitting() -> None:
    config = load_config(None, [])
    splits = get_task("sentiment").load_splits(config)
    assert splits.labels == ["negative", "neutral", "positive"]
    texts = [{D.normalise(t) for t, _ in s} for s in (splits.train, splits.validation, splits.test)]
    total = len(splits.train) + len(splits.validation) + len(splits.test)
    assert sum(len(t) for t in texts) == total  # no duplicate inside a split either
    assert not (texts[0] & texts[2]) and not (texts[0] & texts[1]) and not (texts[1] & texts[2])
    assert 36_000 < total < 38_158  # the corpus has 38,158 rows, some of them repeats
    labels = torch.tensor([y for _, y in splits.test])
    assert 0.38 < (labels == labels.mode().values).float().mean() < 0.46  # majority class ~0.42


def test_classification_task_labels_come_from_training_data(tiny_csv: Path) -> None:
    config = load_config(None, ["task=classification", f"data.path={tiny_csv}", "data.max_eval_examples=4"])
    splits = get_task("classification").load_splits(config)
    assert splits.labels == ["negative", "neutral", "positive"]
    assert len(splits.test) == 4 and len(splits.train) == 48
