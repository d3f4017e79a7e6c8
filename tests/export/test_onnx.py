"""``deltatune export --format onnx``: a trained tiny classifier and a tiny decoder, end to end.

The exported file is run by ONNX Runtime here, independently of the exporter's own check: its
logits equal the PyTorch model's (fp32), the label names and tokenizer sit beside it, int8
quantization writes a smaller file whose test accuracy is reported, and a decoder with its KV
cache generates the same greedy tokens as ``model.generate``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from deltatune.cli import app

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
runner = CliRunner()


def invoke(*args: object, code: int = 0) -> str:
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result.output


@pytest.fixture(scope="module")
def classifier_run(tiny_bert: Path, tiny_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "cls"
    invoke("train", "--set", f"model={tiny_bert}", "--set", "task=classification", "--set", f"data.path={tiny_csv}",
           "--set", "epochs=2", "--set", "batch_size=8", "--set", "adapter.rank=2", "--set", "adapter.alpha=4",
           "--set", "adapter.target=all-linear", "--set", "precision=fp32", "--output", run, "--no-progress")
    return run


def test_classifier_onnx_matches_pytorch_and_int8_is_scored(classifier_run: Path, tmp_path: Path) -> None:
    import onnxruntime as ort

    from deltatune.train import load_trained

    out = tmp_path / "onnx"
    text = invoke("export", classifier_run, "--format", "onnx", "--output", out, "--quantize", "int8")
    assert "largest difference" in text and "ONNX int8" in text
    facts = json.loads((out / "export.json").read_text())
    assert facts["kind"] == "classification" and facts["labels"] == ["negative", "neutral", "positive"]
    assert facts["adapter"] == "merged into the weights" and facts["max_abs_diff"] < 1e-4
    assert set(facts["test"]) == {"onnx_fp32", "onnx_int8"} and facts["test_examples"] == 9
    assert (out / "model.int8.onnx").stat().st_size < (out / "model.onnx").stat().st_size
    assert facts["files"]["model.int8.onnx"] == (out / "model.int8.onnx").stat().st_size
    # the fp32 file's test accuracy is the run's own (same split, same model)
    metrics = json.loads((classifier_run / "metrics.json").read_text())
    assert facts["test"]["onnx_fp32"]["accuracy"] == pytest.approx(metrics["test_accuracy"])

    # what a deployment does: the tokenizer beside the model, ONNX Runtime, label names from export.json
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    texts = ["good great day", "awful sad food today", "the meeting"]
    enc = tokenizer(texts, padding=True, return_tensors="np")
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = sess.run(["logits"], {"input_ids": enc["input_ids"].astype(np.int64),
                                   "attention_mask": enc["attention_mask"].astype(np.int64)})[0]
    trained = load_trained(classifier_run)
    with torch.no_grad():
        ref = trained.model(**tokenizer(texts, padding=True, return_tensors="pt")).logits
    np.testing.assert_allclose(logits, ref.numpy(), atol=1e-5)
    int8 = ort.InferenceSession(str(out / "model.int8.onnx"), providers=["CPUExecutionProvider"])
    assert int8.run(["logits"], {"input_ids": enc["input_ids"].astype(np.int64),
                                 "attention_mask": enc["attention_mask"].astype(np.int64)})[0].shape == (3, 3)


def test_export_refuses_bad_input_before_work(classifier_run: Path, tmp_path: Path) -> None:
    assert "--format takes onnx or gguf" in invoke("export", classifier_run, "--output", tmp_path / "x", code=2)
    assert "--quantize takes int8" in invoke("export", classifier_run, "--format", "onnx", "--output",
                                             tmp_path / "x", "--quantize", "int4", code=2)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert "error:" in invoke("export", classifier_run, "--format", "onnx", "--output", foreign, code=2)
    assert (foreign / "notes.txt").read_text() == "mine"


def test_a_run_on_a_quantized_base_exports_as_the_trained_model(tiny_bert: Path, tiny_csv: Path, tmp_path: Path) -> None:
    """ONNX has no operator for a 4-bit kernel: the NF4 base is dequantized before merging (as
    ``deltatune merge`` does), and the file reproduces the model trained on that base."""
    import onnxruntime as ort
    from transformers import AutoTokenizer

    from deltatune.train import load_trained

    pytest.importorskip("bitsandbytes")
    run, out = tmp_path / "nf4", tmp_path / "onnx"
    invoke("train", "--set", f"model={tiny_bert}", "--set", "task=classification", "--set", f"data.path={tiny_csv}",
           "--set", "epochs=1", "--set", "batch_size=8", "--set", "adapter.rank=2", "--set", "precision=fp32",
           "--set", "quantize=nf4", "--output", run, "--no-progress")
    invoke("export", run, "--format", "onnx", "--output", out)
    facts = json.loads((out / "export.json").read_text())
    assert facts["adapter"] == "merged into the weights" and facts["max_abs_diff"] < 1e-4
    assert facts["test"]["onnx_fp32"]["accuracy"] == pytest.approx(json.loads((run / "metrics.json").read_text())["test_accuracy"])
    tokenizer = AutoTokenizer.from_pretrained(out)
    enc = tokenizer(["good great day", "awful sad food today"], padding=True, return_tensors="np")
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = sess.run(["logits"], {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask")})[0]
    trained = load_trained(run)  # the NF4 base, quantized afresh, with the adapter: what was trained
    assert any("4bit" in type(m).__name__ or "NF4" in type(m).__name__ for m in trained.model.modules())
    with torch.no_grad():
        ref = trained.model(**{k: torch.from_numpy(enc[k]) for k in ("input_ids", "attention_mask")}).logits
    np.testing.assert_allclose(logits, ref.numpy(), atol=1e-4)
