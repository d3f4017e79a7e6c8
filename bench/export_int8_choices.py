"""Static int8 choices for an image model: size and test accuracy of each, through ONNX Runtime.

    .venv/bin/python -m bench.export_int8_choices RUN [--max-test 10000] [--only base,bias_float,...]

What ``deltatune export RUN --format onnx --quantize int8`` chose for convolutional models (see
``deltatune.export.onnx``), against the alternatives, on one fp32 export of RUN (an image run):
each choice is ``quantize_static`` (QDQ, int8 weights, uint8 activations) on the same
``quant_pre_process``-ed file, calibrated on the first N pictures of the run's validation +
training splits (what the export uses), then scored on the test split (``--max-test`` pictures,
preprocessed by the task itself) by ONNX Runtime at one thread. Sizes are ratios to the fp32
file; accuracy changes are points against the fp32 file; calibration seconds are wall time (noisy
on a shared machine). JSON: ``bench/results/export-int8-choices.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch


def choices(convs: list[str]) -> dict[str, dict[str, Any]]:
    """name -> quantize_static keyword arguments (plus ``pictures``, ``batch``, ``drop_zero_points``)."""
    from onnxruntime.quantization import CalibrationMethod

    first, last = convs[0], convs[-1]
    return {
        "base": {},                                                         # per-channel, MinMax on 256
        "first_conv_float": {"nodes_to_exclude": [first]},
        "classifier_float": {"nodes_to_exclude": [last]},
        "first_conv_and_classifier_float": {"nodes_to_exclude": [first, last]},
        "minmax_1024_pictures": {"pictures": 1024},
        "percentile": {"calibrate_method": CalibrationMethod.Percentile, "batch": 32},
        "entropy": {"calibrate_method": CalibrationMethod.Entropy, "batch": 32},
        "reduce_range": {"reduce_range": True},
        "per_tensor": {"per_channel": False},
        "logits_float": {"extra_options": {"OpTypesToExcludeOutputQuantization": ["Gemm"]}},
        "bias_float": {"extra_options": {"QuantizeBias": False}},
        "bias_float_zero_points_dropped": {"extra_options": {"QuantizeBias": False}, "drop_zero_points": True},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--max-test", type=int, default=10000)
    parser.add_argument("--only", default=None, help="comma-separated choice names (default: all)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/export-int8-choices.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)

    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from deltatune.export.onnx import CALIBRATION_PICTURES, drop_zero_points, export_onnx
    from deltatune.export.runtime import session
    from deltatune.export.tasks import _collate
    from deltatune.train import load_trained

    overrides = {"data": {"max_eval_examples": args.max_test}}
    trained = load_trained(args.run, overrides)
    task, tok, config = trained.task, trained.tokenizer, trained.config
    splits = task.load_splits(config, trained.labels)
    items = task.encode(tok, splits.test, config.max_length)
    pixels = np.concatenate([_collate(task, items[i:i + 500], tok)["pixel_values"].numpy()
                             for i in range(0, len(items), 500)])                 # (N, 3, size, size)
    labels = np.array([it["label"] for it in items])
    pool = splits.validation + splits.train

    def pictures(n: int) -> list[np.ndarray]:
        return [_collate(task, [it], tok)["pixel_values"].numpy()
                for it in task.encode(tok, pool[:n], config.max_length)]

    def accuracy(path: Path) -> float:
        sess = session(path, 1)
        pred = np.concatenate([sess.run(None, {"pixel_values": pixels[i:i + 250]})[0].argmax(1)
                               for i in range(0, len(pixels), 250)])
        return float((pred == labels).mean())

    class Reader(CalibrationDataReader):
        def __init__(self, feeds: list[np.ndarray], batch: int) -> None:
            self.rest = iter([np.concatenate(feeds[i:i + batch]) for i in range(0, len(feeds), batch)])

        def get_next(self) -> dict[str, Any] | None:
            x = next(self.rest, None)
            return None if x is None else {"pixel_values": x}

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        export_onnx(args.run, tmp / "onnx", None, overrides, say=lambda *_: None)
        fp32 = tmp / "onnx" / "model.onnx"
        prepared = tmp / "prepared.onnx"
        quant_pre_process(str(fp32), str(prepared))
        convs = [n.name for n in onnx.load(str(prepared)).graph.node if n.op_type in ("Conv", "Gemm")]
        base_acc, base_size = accuracy(fp32), fp32.stat().st_size
        print(f"fp32: accuracy {base_acc:.4f} on {len(labels)} test pictures, {base_size / 2**20:.2f} MiB")
        table = choices(convs)
        names = args.only.split(",") if args.only else list(table)
        results = []
        for name in names:
            kw = dict(table[name])
            n, batch, drop = kw.pop("pictures", CALIBRATION_PICTURES), kw.pop("batch", 1), kw.pop("drop_zero_points", False)
            kw.setdefault("per_channel", True)
            target = tmp / f"{name}.onnx"
            started = time.perf_counter()
            quantize_static(str(prepared), str(target), Reader(pictures(n), batch), quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, **kw)
            seconds = time.perf_counter() - started
            if drop:
                drop_zero_points(target)
            acc, size = accuracy(target), target.stat().st_size
            results.append({"choice": name, "calibration_pictures": n, "accuracy": acc,
                            "points_vs_fp32": round(100 * (acc - base_acc), 2),
                            "size_vs_fp32": round(size / base_size, 4), "size_bytes": size,
                            "quantize_seconds": round(seconds, 1)})
            print(f"{name:<34}{acc:>8.4f}{results[-1]['points_vs_fp32']:>+8.2f} points"
                  f"{results[-1]['size_vs_fp32']:>9.4f}x size{seconds:>7.1f} s", flush=True)
    data = {"run": str(args.run), "test_pictures": len(labels), "fp32_accuracy": base_acc, "fp32_bytes": base_size,
            "results": results, "load_average_before": load_before, "load_average_after": os.getloadavg(),
            "threads": 1}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
