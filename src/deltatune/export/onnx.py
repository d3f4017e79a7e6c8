"""``deltatune export RUN --format onnx``: the merged model as ONNX, checked against PyTorch.

1. The run's adapter is folded into the base weights (``merge_and_unload``; an adapter that cannot
   be merged, e.g. a bottleneck, stays in the graph as the layers it adds). A quantized base (NF4 or
   int8) is dequantized to float32 first, the weights the adapter trained against.
2. ``torch.onnx.export`` (the ``torch.export`` path) traces the task kind's spec
   (``export/tasks.py``) with dynamic batch and sequence axes.
3. ONNX Runtime runs the file on the spec's check inputs (other batch sizes, lengths, padding, a
   past for decoders) and must give PyTorch's outputs: the largest difference is reported, and
   above tolerance nothing is written. A decoder must also generate, with its KV cache, the same
   greedy tokens as ``model.generate``.
4. ``--quantize int8``: for transformers, ONNX Runtime's dynamic quantization (int8 weights of
   MatMul/Gather, int8 activations computed per batch); for image models (convolutions, whose spec
   has ``calibrate``), ONNX Runtime's static quantization: ``quant_pre_process`` (shape inference,
   BatchNorm folded into Conv), then QDQ with per-channel int8 weights and int8 activation ranges
   calibrated on ``CALIBRATION_PICTURES`` pictures of the run's validation and training splits,
   preprocessed by the task itself; biases stay float32 (ONNX Runtime quantizes them when it fuses
   the convolutions) and the weights' all-zero zero points are dropped (``drop_zero_points``):
   0.28x instead of 0.30x the fp32 file for MobileNetV2, same accuracy. The run's test split
   is scored by the task's own ``evaluate`` through the fp32 and the int8 file (before / after).

The directory is written whole or not at all (``atomic_directory``): ``model.onnx``,
``model.int8.onnx`` (with ``--quantize int8``), the tokenizer files (or the image
preprocessing), and ``export.json`` (label names, input layout, checks, sizes, test metrics).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from deltatune.export.runtime import OrtModel, file_bytes, need_onnxruntime, run_ort, run_session, session
from deltatune.export.spec import OnnxSpec
from deltatune.export.tasks import spec_for

EXPORT_FILE = "export.json"
QUANTIZE = ("int8",)
CALIBRATION_PICTURES = 256


def need_onnx() -> None:
    need_onnxruntime()
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise ValueError("ONNX export needs onnx and onnxscript: pip install 'deltatune[export]'") from None


def export_onnx(run: str | Path, output: Path, quantize: str | None = None,
                overrides: dict[str, Any] | None = None, say: Any = print) -> dict[str, Any]:
    """Export the run (a run directory, its adapter, or a merged model) to ``output``; returns export.json's data."""
    import deltatune as dt
    from deltatune.core.files import atomic_directory, check_replaceable
    from deltatune.train import load_trained
    from deltatune.train.models import read_trained

    if quantize is not None and quantize not in QUANTIZE:
        raise ValueError(f"--quantize takes {', '.join(QUANTIZE)}, not {quantize!r}")
    need_onnx()
    recorded = read_trained(run, overrides)  # before any weights: a wrong run or task fails first
    build = spec_for(recorded.task.kind)
    check_replaceable(output)
    trained = load_trained(run, overrides)
    model, task, config = trained.model, trained.task, trained.config
    merged = _merge(model, dt)
    splits = task.load_splits(config, trained.labels)
    examples = splits.test
    spec = build(task, model, trained.tokenizer, trained.labels, config, examples)
    facts: dict[str, Any] = {"format": "onnx", "source": str(trained.source), "task": config.task,
                             "kind": spec.kind, "method": config.method, "adapter": merged, **spec.meta}
    with atomic_directory(output) as tmp:
        started = time.perf_counter()
        _export(spec, tmp / "model.onnx")
        facts["export_seconds"] = round(time.perf_counter() - started, 1)
        sess = session(tmp / "model.onnx")
        facts["max_abs_diff"], facts["checked_inputs"] = check(spec, sess)
        say(f"ONNX Runtime vs PyTorch on {facts['checked_inputs']} inputs: largest difference {facts['max_abs_diff']:.2e}")
        if spec.verify:
            facts.update(spec.verify(sess))
        facts["files"] = {"model.onnx": file_bytes(tmp / "model.onnx")}
        if spec.write_beside:
            spec.write_beside(tmp)
        items = task.encode(trained.tokenizer, examples, config.max_length)
        facts["test_examples"] = len(items)
        facts["test"] = {"onnx_fp32": _score(task, sess, spec, model, trained.tokenizer, items, config)}
        say(f"test split ({len(items)} examples), ONNX fp32: {_metrics_line(facts['test']['onnx_fp32'])}")
        if quantize:
            calibration = (splits.validation + splits.train)[:CALIBRATION_PICTURES] if spec.calibrate else None
            more, size, test = _quantize(tmp, spec, sess, model, task, trained.tokenizer, items, config, say,
                                         calibration)
            facts.update(more)
            facts["files"]["model.int8.onnx"] = size
            facts["test"]["onnx_int8"] = test
            facts["int8_size_ratio"] = round(size / facts["files"]["model.onnx"], 4)
        (tmp / EXPORT_FILE).write_text(json.dumps(facts, indent=2, ensure_ascii=False) + "\n")
    return facts


def _merge(model: torch.nn.Module, dt: Any) -> str:
    """Fold the adapter into the weights if every part of it can be; say what was done. A quantized
    base (a run trained with ``quantize: nf4 | int8``) is dequantized first, as ``deltatune merge``
    does: ONNX has no operator for bitsandbytes' or torchao's kernels, and the dequantized weights are
    the ones the adapter was trained against, so the file reproduces the trained model."""
    dt.dequantize(model)  # a no-op for a full-precision base
    if not dt.configs(model):
        return "none (a full model)"
    try:
        dt.merge_and_unload(model)
        return "merged into the weights"
    except ValueError as err:  # e.g. a bottleneck adapter: it stays in the graph
        return f"kept as layers in the graph ({err})"


def _export(spec: OnnxSpec, path: Path) -> None:
    import warnings

    big = sum(p.numel() * p.element_size() for p in spec.module.parameters()) > 1_800_000_000
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's own chatter (deprecations inside transformers)
        torch.onnx.export(spec.module, spec.args(spec.sample), str(path), input_names=spec.inputs,
                          output_names=spec.outputs, dynamic_shapes=spec.shapes(), dynamo=True,
                          external_data=big, verbose=False, report=False)


@torch.no_grad()
def check(spec: OnnxSpec, sess: Any, reference: torch.nn.Module | None = None) -> tuple[float, int]:
    """The largest |ONNX Runtime − PyTorch| over the spec's sample and check inputs; refuses a wrong file."""
    worst = 0.0
    feeds = [spec.sample, *spec.checks]
    for n, feed in enumerate(feeds):
        ref = spec.module(*spec.args(feed))
        ref = list(ref) if isinstance(ref, (tuple, list)) else [ref]
        got = run_session(sess, feed)
        if spec.compare:
            ref, got = spec.compare(feed, ref), spec.compare(feed, got)
        for name, r, g in zip(spec.outputs, ref, got):
            if r.shape != g.shape:
                raise RuntimeError(f"ONNX output {name!r} has shape {tuple(g.shape)}, PyTorch's {tuple(r.shape)} "
                                   f"(check input {n}); the export is wrong, nothing written")
            diff = float((r.float() - g.float()).abs().max()) if r.numel() else 0.0
            tolerance = 1e-3 + 1e-4 * float(r.abs().max()) if r.numel() else 0.0
            if not diff <= tolerance:
                raise RuntimeError(f"ONNX Runtime's {name!r} differs from PyTorch's by {diff:.3g} (tolerance "
                                   f"{tolerance:.3g}) on check input {n}; the export is wrong, nothing written")
            worst = max(worst, diff)
    return worst, len(feeds)


def _score(task: Any, sess: Any, spec: OnnxSpec, model: torch.nn.Module, tokenizer: Any, items: list,
           config: Any) -> dict[str, float]:
    """The task's own test metrics, computed through ONNX Runtime."""
    metrics = task.evaluate(OrtModel(sess, spec, getattr(model, "config", None)), items, tokenizer, config.eval_batch_size, run_ort)
    return {k: round(float(v), 6) for k, v in metrics.items()}


def _metrics_line(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def _quantize(tmp: Path, spec: OnnxSpec, sess: Any, model: torch.nn.Module, task: Any, tokenizer: Any,
              items: list, config: Any, say: Any,
              calibration: list[tuple] | None = None) -> tuple[dict[str, Any], int, dict[str, float]]:
    """ONNX Runtime int8 quantization (static if ``calibration`` examples, else dynamic), and the test split before and after."""
    source, target = tmp / "model.onnx", tmp / "model.int8.onnx"
    if calibration is not None and spec.calibrate:
        facts = _quantize_static(source, target, spec.calibrate(calibration), tmp)
    else:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8)
        facts = {"quantization": "onnxruntime quantize_dynamic, int8 weights (QInt8), int8 activations per batch"}
    int8 = session(target)
    worst = 0.0
    with torch.no_grad():
        for feed in [spec.sample, *spec.checks]:
            a, b = run_session(sess, feed), run_session(int8, feed)
            if spec.compare:
                a, b = spec.compare(feed, a), spec.compare(feed, b)
            worst = max(worst, max(float((x - y).abs().max()) if x.numel() else 0.0 for x, y in zip(a, b)))
    facts["int8_max_abs_diff_vs_fp32"] = worst
    test = _score(task, int8, spec, model, tokenizer, items, config)
    say(f"test split, ONNX int8: {_metrics_line(test)} (largest output change vs fp32 {worst:.3g})")
    if spec.verify:
        facts["int8"] = spec.verify(int8)
    return facts, file_bytes(target), test


def _quantize_static(source: Path, target: Path, feeds: list[dict[str, Tensor]], tmp: Path) -> dict[str, Any]:
    """Static QDQ int8: per-channel int8 weights, activation ranges from ``feeds`` (MinMax)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not feeds:
        raise ValueError("static int8 quantization needs calibration pictures; the run's training split is empty")

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.rest = iter(feeds)

        def get_next(self) -> dict[str, Any] | None:
            feed = next(self.rest, None)
            return None if feed is None else {k: v.numpy() for k, v in feed.items()}

    prepared = tmp / "model.prepared.onnx"
    try:
        quant_pre_process(str(source), str(prepared))  # shape inference, BatchNorm folded into Conv
        # QuantizeBias=False: biases stay float32 (4 bytes each, like int32 ones, but without an int32
        # zero point and a float scale per channel); ONNX Runtime quantizes them itself when it fuses
        # DequantizeLinear -> Conv -> QuantizeLinear into QLinearConv, so the model still runs int8.
        quantize_static(str(prepared), str(target), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        extra_options={"QuantizeBias": False})
    finally:
        prepared.unlink(missing_ok=True)
    dropped = drop_zero_points(target)
    return {"quantization": f"onnxruntime quantize_static (QDQ), per-channel int8 weights (QInt8), uint8 "
                            f"activations calibrated (MinMax) on {len(feeds)} training/validation pictures, "
                            "float32 biases (quantized by ONNX Runtime when it fuses the convolutions)",
            "calibration_pictures": len(feeds), "zero_points_dropped": dropped}


def drop_zero_points(path: Path) -> int:
    """Remove the all-zero zero points of the DequantizeLinear nodes of a Conv's weights (and int32 biases).

    Symmetric int8 weights (and int32 biases) have zero points that are all 0, one per output channel
    (an int32 one as many bytes as the bias itself). ONNX defines an absent zero point as 0, so the
    model computes exactly the same, and ONNX Runtime still fuses each DequantizeLinear -> Conv ->
    QuantizeLinear into one QLinearConv. Only before a Conv: ONNX Runtime's Gemm fusion (QGemm) wants
    them. Rewrites ``path`` in place; returns how many were removed.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    constants = {t.name: t for t in graph.initializer}
    readers: dict[str, set[str]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, set()).add(node.op_type)
    dropped = 0
    for node in graph.node:
        if (node.op_type == "DequantizeLinear" and len(node.input) == 3 and node.input[0] in constants
                and node.input[2] in constants and readers.get(node.output[0]) == {"Conv"}
                and not numpy_helper.to_array(constants[node.input[2]]).any()):
            del node.input[2]
            dropped += 1
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    onnx.save(model, str(path))
    return dropped
