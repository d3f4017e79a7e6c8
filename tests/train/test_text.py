"""task: text — documents from a folder or JSONL, packed into full blocks, split by document,
and a run on a tiny random Llama scored against its base on held-out documents."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from deltatune.train import load_config, run_training
from deltatune.train.models import read_trained
from deltatune.train.chat import chatterbot_pairs
from deltatune.train.tasks import get_task
from deltatune.train.text import pack, read_documents, stdlib_modules
from tests.train.tiny import make_tiny_llama


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def _folder(path: Path, n: int = 30) -> Path:
    """``n`` small documents the tiny tokenizer knows (chatterbot turns), as .txt and .md files."""
    path.mkdir(parents=True, exist_ok=True)
    pairs = chatterbot_pairs()
    for i in range(n):
        text = "\n".join(f"{p} {r}" for p, r in pairs[i * 6:(i + 1) * 6])
        (path / f"doc{i:02d}{'.md' if i % 2 else '.txt'}").write_text(text)
    (path / "image.png").write_bytes(b"\x89PNG\0\0")  # not a text suffix: ignored
    return path


def test_pack_fills_blocks_and_keeps_one_short_tail() -> None:
    blocks = pack([[1, 2, 3], [4, 5], [6, 7, 8, 9]], separator=0, block=4)
    assert blocks == [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 0]]
    assert pack([[1, 2, 3, 4, 5]], separator=None, block=2, limit=2) == [[1, 2], [3, 4]]


def test_documents_from_a_folder_a_file_and_jsonl(tmp_path: Path) -> None:
    docs = read_documents(_folder(tmp_path / "docs", 4))
    assert [Path(w).name for _, w in docs] == ["doc00.txt", "doc01.md", "doc02.txt", "doc03.md"]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(json.dumps({"text": "a b"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"d.jsonl, line 2: no string 'text' field"):
        read_documents(jsonl)
    jsonl.write_text(json.dumps({"body": "a b"}) + "\n")
    assert read_documents(jsonl, "body") == [("a b", f"{jsonl}, line 1")]
    with pytest.raises(ValueError, match="holds no text files"):
        read_documents(_empty(tmp_path))


def _empty(tmp_path: Path) -> Path:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.bin").write_bytes(b"\0")
    return tmp_path / "empty"


def test_blocks_are_full_and_every_token_is_a_target(tiny_llama: Path, tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    config = load_config(None, ["task=text", f"model={tiny_llama}", f"data.path={_folder(tmp_path / 'd')}",
                                "max_length=32"])
    task = get_task("text")
    splits = task.load_splits(config)
    names = [{w for _, w in s} for s in (splits.train, splits.validation, splits.test)]
    assert not (names[0] & names[1]) and not (names[0] & names[2])  # split by document
    items = task.encode(tokenizer, splits.train, 32)
    assert all(len(it["input_ids"]) == 32 for it in items[:-1]) and len(items) > 5
    assert all(it["labels"] == it["input_ids"] for it in items)
    batch = task.collate(items[:4], tokenizer)
    assert int((batch["attention_mask"] == 0).sum()) == 0  # no padding in full blocks


def test_builtin_default_is_stdlib_source_split_by_module() -> None:
    config = load_config(None, ["task=text"])
    assert config.model == "smollm2-135m" and config.adapter_config().target == "all-linear"
    splits = get_task("text").load_splits(config)
    assert len(splits.train) + len(splits.validation) + len(splits.test) == len(stdlib_modules())
    assert {w for _, w in splits.train}.isdisjoint({w for _, w in splits.test})
    assert splits.train.block_limit == 384 and splits.test.block_limit == 48


def test_text_run_on_a_tiny_llama(tiny_llama: Path, tmp_path: Path) -> None:
    data = _folder(tmp_path / "docs", 40)
    config = load_config(None, ["task=text", f"model={tiny_llama}", f"data.path={data}", "max_length=32",
                                f"output={tmp_path / 'run'}", "batch_size=8", "epochs=2", "lr=1e-2",
                                "threads=1", "tensorboard=false", "data.max_train_examples=48"])
    metrics = run_training(config, progress=False)
    assert metrics["train_tokens"] == 48 * 32  # the cap counts blocks
    assert metrics["test_perplexity"] < metrics["base_test_perplexity"]
    assert 0 < metrics["perplexity_reduction"] < 1
    assert "lower after training" in get_task("text").summary(metrics)
    # `deltatune eval RUN --set data.max_eval_examples=N` keeps the recorded data.path (a flat update of
    # the recorded config dropped it and scored the built-in stdlib data instead); new files replace it.
    kept = read_trained(tmp_path / "run", {"data": {"max_eval_examples": 5}}).config.data
    assert (kept.path, kept.max_eval_examples, kept.max_train_examples) == (str(data), 5, 48)
    other = read_trained(tmp_path / "run", {"data": {"path": str(tmp_path / "more")}}).config.data
    assert (other.path, other.max_train_examples) == (str(tmp_path / "more"), 48)


def test_scoring_overrides_merge_into_the_recorded_config_and_data_files_replace_as_a_set() -> None:
    from deltatune.train.models import _over_recorded

    recorded = {"task": "classification", "data": {"path": "all.csv", "label_column": "y", "max_eval_examples": 9}}
    assert _over_recorded(recorded, {"data": {"max_eval_examples": 5}})["data"] == {
        "path": "all.csv", "label_column": "y", "max_eval_examples": 5}
    files = {"train": "a.csv", "validation": "b.csv", "test": "c.csv"}
    assert _over_recorded(recorded, {"data": files})["data"] == {"label_column": "y", "max_eval_examples": 9, **files}
    assert _over_recorded(recorded, {"model": "m"}) == {**recorded, "model": "m"}
