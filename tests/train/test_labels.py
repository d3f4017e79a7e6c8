"""Labels are names, not positions: a classifier keeps its label names, and eval/predict map data by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import deltatune as dt
from deltatune.cli import app
from deltatune.train.models import load_trained
from tests.train.tiny import save_tiny_classifier

LABELS = ["negative", "neutral", "positive"]
runner = CliRunner()


def _csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("text,label\n" + "".join(f"{t},{label}\n" for t, label in rows))
    return path


def _eval(model: Path, data: Path, *sets: str) -> dict:
    # the same file as every split, so the test split is the whole file
    args = ["eval", str(model), "--set", f"data.train={data}", "--set", f"data.validation={data}",
            "--set", f"data.test={data}", *[a for s in sets for a in ("--set", s)]]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


@pytest.fixture(scope="module")
def always_positive(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-class adapter that answers 'positive' for every text: its right answers are known."""
    return save_tiny_classifier(tiny_bert, tmp_path_factory.mktemp("pos") / "adapter", LABELS, predict="positive")


def test_eval_maps_labels_by_name_on_data_with_a_subset_of_them(always_positive: Path, tmp_path: Path) -> None:
    # Re-indexing from the file (['neutral', 'positive'] -> 0, 1) scored this half-right model 0.0,
    # and a file of 'positive' rows alone failed with "needs at least 2 labels".
    two = _csv(tmp_path / "two.csv", [("good day", "positive"), ("the day", "neutral"), ("nice", "positive"),
                                      ("the food", "neutral")])
    assert _eval(always_positive, two)["accuracy"] == 0.5
    only_positive = _csv(tmp_path / "pos.csv", [("good day", "positive"), ("great food", "positive")])
    assert _eval(always_positive, only_positive)["accuracy"] == 1.0  # perfect on this data


def test_eval_of_an_unknown_label_names_it_and_the_known_ones(always_positive: Path, tmp_path: Path) -> None:
    data = _csv(tmp_path / "d.csv", [("good day", "positive"), ("hmm", "mixed")])
    result = runner.invoke(app, ["eval", str(always_positive), "--set", f"data.train={data}",
                                 "--set", f"data.validation={data}", "--set", f"data.test={data}"])
    assert result.exit_code == 2
    assert "labels ['mixed'] that the model does not know (known: negative, neutral, positive)" in result.output


def test_training_records_the_ordered_label_names(tiny_bert: Path, tiny_csv: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", "--set", f"model={tiny_bert}", "--set", "task=classification",
                                 "--set", f"data.path={tiny_csv}", "--set", "epochs=1", "--set", "batch_size=16",
                                 "--set", "adapter.rank=2", "--set", "precision=fp32", "--output", str(run),
                                 "--no-progress"])
    assert result.exit_code == 0, result.output
    meta = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert meta["training"]["labels"] == LABELS
    assert load_trained(run).labels == LABELS


def _bare_peft(tiny_bert: Path, out: Path, labels: list[str], predict: str) -> Path:
    save_tiny_classifier(tiny_bert, out, labels, predict=predict, format="peft", meta=False)
    (out / ".deltatune-files.json").unlink()  # as PEFT itself writes it: its two files and nothing else
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert dt.read_adapter_config(out)["modules_to_save"] == ["classifier"]
    return out


def test_eval_of_a_bare_peft_adapter_takes_sorted_labels_from_the_data(tiny_bert: Path, tmp_path: Path) -> None:
    adapter = _bare_peft(tiny_bert, tmp_path / "peft", LABELS, predict="neutral")
    data = _csv(tmp_path / "d.csv", [("the day", "neutral"), ("good", "positive"), ("bad", "negative"),
                                     ("the food", "neutral")])
    scores = _eval(adapter, data, "task=classification", f"model={tiny_bert}")
    assert scores["accuracy"] == 0.5 and scores["examples"] == 4
    out = tmp_path / "preds.jsonl"
    (tmp_path / "in.txt").write_text("good day\n")
    result = runner.invoke(app, ["predict", str(adapter), "--input", str(tmp_path / "in.txt"), "--output", str(out),
                                 "--set", "task=classification", "--set", f"model={tiny_bert}",
                                 "--set", f"data.path={data}"])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["label"] == "neutral"


def test_bare_adapter_head_size_mismatch_says_so(tiny_bert: Path, tmp_path: Path) -> None:
    adapter = _bare_peft(tiny_bert, tmp_path / "peft", LABELS, predict="neutral")
    data = _csv(tmp_path / "d.csv", [("a", "w"), ("b", "x"), ("c", "y"), ("d", "z")])
    result = runner.invoke(app, ["eval", str(adapter), "--set", "task=classification", "--set", f"model={tiny_bert}",
                                 "--set", f"data.path={data}"])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "the adapter's classifier has 3 outputs but data.path has 4 labels: w, x, y, z" in text
    assert "different base model" not in text
