"""The ``deltatune`` command line end to end on a tiny random BERT: train, eval, predict, merge, inspect."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from deltatune.cli import app

runner = CliRunner()


def invoke(*args: str) -> str:
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("command", ["train", "eval", "predict", "merge", "inspect"])
def test_every_command_has_help(command: str) -> None:
    out = invoke(command, "--help")
    assert "Usage" in out and "--help" in out


def test_train_eval_predict_merge_inspect(tiny_bert: Path, tiny_csv: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    out = invoke("train", "--set", f"model={tiny_bert}", "--set", "task=classification",
                 "--set", f"data.path={tiny_csv}", "--set", "epochs=1", "--set", "batch_size=8",
                 "--set", "adapter.rank=2", "--set", "precision=fp32", "--output", run, "--no-progress")
    assert "test accuracy" in out and "majority class" in out
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"test_accuracy", "test_macro_f1", "majority_baseline_accuracy", "peak_memory_mb"} <= set(metrics)

    # `--resume` alone continues the run as it was configured (here: already finished, same result)
    assert "resumed from" in invoke("train", "--output", run, "--resume", "--no-progress")
    again = json.loads((run / "metrics.json").read_text())
    assert again["test_accuracy"] == metrics["test_accuracy"] and again["resumed"] is True

    # eval on the test split reproduces the run's own test metrics (same seed, same split)
    scores = json.loads(invoke("eval", run, "--split", "test", "--output", tmp_path / "eval.json"))
    assert scores["accuracy"] == metrics["test_accuracy"] and scores["examples"] == 6
    assert json.loads((tmp_path / "eval.json").read_text()) == scores

    inputs = tmp_path / "in.jsonl"
    inputs.write_text("".join(json.dumps({"text": t, "id": i}) + "\n"
                              for i, t in enumerate(["good great day", "awful sad food", "the meeting"])))
    invoke("predict", run / "adapter", "--input", inputs, "--output", tmp_path / "preds.jsonl")
    preds = [json.loads(line) for line in (tmp_path / "preds.jsonl").read_text().splitlines()]
    assert [p["text"] for p in preds] == ["good great day", "awful sad food", "the meeting"]
    assert all(p["label"] in ("negative", "neutral", "positive") and len(p["logits"]) == 3 for p in preds)
    assert all(p["label"] == ["negative", "neutral", "positive"][max(range(3), key=p["logits"].__getitem__)]
               for p in preds)

    # merge writes a plain transformers model that gives the adapter's logits
    merged = tmp_path / "merged"
    assert "largest output change" in invoke("merge", run, "--output", merged)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(merged).eval()
    batch = AutoTokenizer.from_pretrained(merged)([p["text"] for p in preds], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert torch.allclose(logits, torch.tensor([p["logits"] for p in preds]), atol=1e-5)  # fp32 run
    assert model.config.id2label[0] == "negative"
    merged_scores = json.loads(invoke("eval", merged))
    assert merged_scores["accuracy"] == scores["accuracy"]

    tree = invoke("inspect", tiny_bert, "--target", "query", "--set", "adapter.rank=2")
    assert "bert.encoder.layer.0.attention.self.query: Linear" in tree and "LoraLinear" in tree
    assert "bert.encoder.layer.1: 1 more BertLayer like bert.encoder.layer.0 (1 adapted in each)" in tree
    assert "classifier: Linear" in tree and "trained in full" in tree
    # 2 layers x query (32 -> 32, rank 2: 2*32 + 32*2) + a 3-way head (32*3 + 3)
    assert f"trainable: {2 * 128 + 99:,} of" in tree


def test_bad_input_is_one_clear_line(tiny_bert: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", "--set", "epoch=1"])
    assert result.exit_code == 2 and "unknown key 'epoch'; did you mean 'epochs'?" in result.output
    result = runner.invoke(app, ["eval", str(tmp_path)])
    assert result.exit_code == 2 and "holds no adapter" in result.output
    result = runner.invoke(app, ["inspect", str(tiny_bert), "--target", "nosuch"])
    assert result.exit_code == 2 and "matched 0 of" in result.output


def test_plan_and_tune_name_their_default_output_after_the_task_set() -> None:
    """``deltatune plan --set task=recommend`` wrote to runs/plan-sentiment: the default directory
    followed --task only, not a task given with --set."""
    from deltatune.cli.common import task_named

    assert task_named([]) == "sentiment"
    assert task_named(["task=chat", "batch_size=4"]) == "chat"
    assert task_named(["task=chat", "task=recommend"]) == "recommend"  # --set comes after --task and wins
