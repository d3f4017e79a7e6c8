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
