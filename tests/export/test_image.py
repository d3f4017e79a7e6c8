"""``deltatune export --format onnx`` on an image run: pixel_values in, logits out, preprocessing.json beside."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.export.test_onnx import invoke

pytest.importorskip("PIL")
pytest.importorskip("onnxruntime")


def test_image_classifier_exports_checked_with_preprocessing(tmp_path: Path) -> None:
    import onnxruntime as ort

    from deltatune.train import load_trained
    from tests.train.images import image_folder

    folder = image_folder(tmp_path / "pictures")
    run = tmp_path / "run"
    invoke("train", "--set", "task=image", "--set", "model=tiny-resnet", "--set", f"data.path={folder}",
           "--set", "data.image.size=16", "--set", "epochs=1", "--set", "batch_size=8",
           "--set", "data.validation_fraction=0.2", "--set", "data.test_fraction=0.2", "--output", run, "--no-progress")
    out = tmp_path / "onnx"
    invoke("export", run, "--format", "onnx", "--output", out, "--quantize", "int8")
    facts = json.loads((out / "export.json").read_text())
    assert facts["kind"] == "image-classification" and facts["max_abs_diff"] < 1e-4
    pre = json.loads((out / "preprocessing.json").read_text())
    assert pre["size"] == 16 and pre["labels"] == facts["labels"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert facts["test"]["onnx_fp32"]["accuracy"] == pytest.approx(metrics["test_accuracy"])
    assert "onnx_int8" in facts["test"]

    pixels = torch.randn(3, 3, 16, 16)
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], {"pixel_values": pixels.numpy()})[0]
    trained = load_trained(run)
    import deltatune as dt

    with torch.no_grad():
        ref = dt.merge_and_unload(trained.model)(pixel_values=pixels).logits
    np.testing.assert_allclose(got, ref.numpy(), atol=1e-4)

    # --quantize int8 on a conv model: static QDQ quantization calibrated on the run's own pictures.
    assert facts["quantization"].startswith("onnxruntime quantize_static (QDQ), per-channel")
    assert 0 < facts["calibration_pictures"] <= 36  # validation + training pictures of the 36
    assert facts["files"]["model.int8.onnx"] < facts["files"]["model.onnx"]
    int8 = ort.InferenceSession(str(out / "model.int8.onnx"), providers=["CPUExecutionProvider"])
    ops = {node.op_type for node in __import__("onnx").load(str(out / "model.int8.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    from deltatune.export.tasks import _collate

    test = trained.task.load_splits(trained.config, trained.labels).test
    pictures = _collate(trained.task, trained.task.encode(trained.tokenizer, test, 64), trained.tokenizer)
    a = sess.run(["logits"], {"pixel_values": pictures["pixel_values"].numpy()})[0]
    b = int8.run(["logits"], {"pixel_values": pictures["pixel_values"].numpy()})[0]
    # int8 activations and weights: within 10% of the logits' range of the fp32 file's logits.
    assert np.abs(a - b).max() <= 0.1 * (a.max() - a.min()), (np.abs(a - b).max(), a.max() - a.min())
