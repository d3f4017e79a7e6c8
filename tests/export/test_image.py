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

    # The convolutions' all-zero weight and bias zero points are gone, and ONNX Runtime still runs
    # every convolution as int8 (DequantizeLinear -> Conv -> QuantizeLinear fused into QLinearConv).
    graph = __import__("onnx").load(str(out / "model.int8.onnx")).graph
    constants = {t.name for t in graph.initializer}
    into_conv = {name for node in graph.node if node.op_type == "Conv" for name in node.input}
    weights = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.output[0] in into_conv
               and n.input[0] in constants]
    assert weights and all(len(n.input) == 2 for n in weights)
    int32 = __import__("onnx").TensorProto.INT32
    assert not [t.name for t in graph.initializer if t.data_type == int32]  # biases stay float32
    assert facts["zero_points_dropped"] == len(weights)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(out / "model.int8.onnx"), options, providers=["CPUExecutionProvider"])
    fused = [n.op_type for n in __import__("onnx").load(str(tmp_path / "optimized.onnx")).graph.node]
    assert fused.count("QLinearConv") == sum(n.op_type == "Conv" for n in graph.node) and "Conv" not in fused


def test_dropping_zero_points_keeps_the_model_exact(tmp_path: Path) -> None:
    """``drop_zero_points``: same outputs, smaller file; a Gemm's zero points (QGemm needs them) stay."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from deltatune.export.onnx import drop_zero_points

    rng = np.random.default_rng(0)

    def const(name: str, array: np.ndarray) -> onnx.TensorProto:
        return numpy_helper.from_array(array, name)

    inits = [const("w_q", rng.integers(-127, 128, (4, 3, 3, 3)).astype(np.int8)),
             const("w_s", rng.uniform(0.01, 0.02, 4).astype(np.float32)), const("w_z", np.zeros(4, np.int8)),
             const("b_q", rng.integers(-500, 500, 4).astype(np.int32)),
             const("b_s", rng.uniform(1e-4, 2e-4, 4).astype(np.float32)), const("b_z", np.zeros(4, np.int32)),
             const("g_q", rng.integers(-127, 128, (2, 16)).astype(np.int8)),
             const("g_s", np.float32(0.01)), const("g_z", np.int8(0)), const("shape", np.array([1, 16], np.int64))]
    nodes = [helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_z"], ["w"], axis=0),
             helper.make_node("DequantizeLinear", ["b_q", "b_s", "b_z"], ["b"], axis=0),
             helper.make_node("Conv", ["x", "w", "b"], ["c"]),                  # (1, 4, 2, 2)
             helper.make_node("Reshape", ["c", "shape"], ["flat"]),             # (1, 16)
             helper.make_node("DequantizeLinear", ["g_q", "g_s", "g_z"], ["g"]),
             helper.make_node("Gemm", ["flat", "g"], ["y"], transB=1)]          # (1, 2)
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], inits)
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), str(path))
    x = rng.standard_normal((1, 3, 4, 4)).astype(np.float32)
    before, size = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0], path.stat().st_size

    assert drop_zero_points(path) == 2
    names = {t.name for t in onnx.load(str(path)).graph.initializer}
    assert "w_z" not in names and "b_z" not in names and "g_z" in names
    after = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(before, after)
    assert path.stat().st_size < size
