"""Export benchmark: file size, CPU latency at batch 1 and test accuracy of PyTorch eager, ONNX fp32, ONNX int8.

    .venv/bin/python -m bench.export RUN [RUN ...] [--rounds 300] [--threads 2] [--examples 32]

For each run (a trained classifier: the sentiment model, the image model), one process:

1. ``deltatune export RUN --format onnx --quantize int8`` into a temporary directory (the export
   checks ONNX Runtime against PyTorch and scores the test split through both ONNX files);
2. the merged PyTorch model (fp32, eager) is scored on the same test split by the same task code;
3. latency: ``--examples`` real test inputs, one at a time (batch 1, no padding). Each round
   takes the next input and times one call of each of the three on it, taking turns (PyTorch,
   fp32, int8, then the reverse order); ``--rounds`` rounds; the median seconds of one call.
   Same thread count (``--threads``) for torch and ONNX Runtime, and ONNX Runtime's pool does
   not spin (``session.intra_op/inter_op.allow_spinning = 0``): a spinning pool keeps the cores
   busy after its call and would slow the PyTorch call that follows it.

Size: the merged weights as one safetensors file (PyTorch) and the .onnx files. Ratios are to
PyTorch eager (latency) and to ONNX fp32 (size). JSON: ``bench/results/export.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

import torch

from bench.measure import median


def bench_run(run: Path, rounds: int, threads: int, examples: int, tmp: Path) -> dict[str, Any]:
    import deltatune as dt
    from deltatune.export.onnx import export_onnx
    from deltatune.export.runtime import run_session, session
    from deltatune.train import load_trained
    from deltatune.train.loop import make_runner

    facts = export_onnx(run, tmp / "onnx", "int8")
    trained = load_trained(run)
    model, task, config, tokenizer = trained.model, trained.task, trained.config, trained.tokenizer
    if dt.configs(model):
        dt.merge_and_unload(model)
    model.eval()
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "merged.safetensors"))
    test = task.load_splits(config, trained.labels).test
    items = task.encode(tokenizer, test, config.max_length)
    eager = task.evaluate(model, items, tokenizer, config.eval_batch_size, make_runner(torch.device("cpu"), "fp32"))

    singles = []
    for item in items[:examples]:  # batch 1, as a deployment sees a request
        batch = task.collate([item], tokenizer)
        batch.pop("labels", None)
        singles.append(batch)
    fp32 = session(tmp / "onnx" / "model.onnx", threads, spin=False)
    int8 = session(tmp / "onnx" / "model.int8.onnx", threads, spin=False)

    def run_torch(b: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            model(**b)

    times = calls({"pytorch": run_torch, "onnx_fp32": lambda b: run_session(fp32, b),
                   "onnx_int8": lambda b: run_session(int8, b)}, singles, rounds)
    per = {name: median(t["wall"]) for name, t in times.items()}
    cpu = {name: median(t["cpu"]) for name, t in times.items()}
    headline = task.headline
    sizes = {"pytorch": (tmp / "merged.safetensors").stat().st_size, "onnx_fp32": facts["files"]["model.onnx"],
             "onnx_int8": facts["files"]["model.int8.onnx"]}
    metric = {"pytorch": eager[headline], "onnx_fp32": facts["test"]["onnx_fp32"][headline],
              "onnx_int8": facts["test"]["onnx_int8"][headline]}
    return {
        "run": str(run), "task": config.task, "model": config.model, "method": config.method,
        "metric": headline, "test_examples": len(items), "latency_examples": len(singles), "rounds": rounds,
        "size_bytes": sizes, "latency_ms": {k: round(v * 1e3, 3) for k, v in per.items()},
        "cpu_ms": {k: round(v * 1e3, 3) for k, v in cpu.items()},
        headline: {k: round(float(v), 4) for k, v in metric.items()},
        "int8_size_vs_fp32": round(sizes["onnx_int8"] / sizes["onnx_fp32"], 3),
        "int8_latency_vs_eager": round(per["onnx_int8"] / per["pytorch"], 3),
        "fp32_latency_vs_eager": round(per["onnx_fp32"] / per["pytorch"], 3),
        "int8_metric_change_points": round(100 * (metric["onnx_int8"] - metric["onnx_fp32"]), 2),
        "onnx_max_abs_diff": facts["max_abs_diff"], "quantization": facts.get("quantization"),
        "latency_p90_ms": {k: round(quantile(t["wall"], 0.9) * 1e3, 3) for k, t in times.items()},
    }


def calls(fns: dict[str, Any], inputs: list[dict[str, torch.Tensor]], rounds: int,
          warmup: int = 3) -> dict[str, dict[str, list[float]]]:
    """Wall and CPU seconds of single calls: round r times each function once on inputs[r % n], taking turns."""
    import time

    names = list(fns)
    for b in inputs[:warmup]:
        for name in names:
            fns[name](b)
    times: dict[str, dict[str, list[float]]] = {n: {"wall": [], "cpu": []} for n in names}
    for r in range(rounds):
        b = inputs[r % len(inputs)]
        for name in names if r % 2 == 0 else names[::-1]:
            t0, c0 = time.perf_counter(), time.process_time()
            fns[name](b)
            times[name]["wall"].append(time.perf_counter() - t0)
            times[name]["cpu"].append(time.process_time() - c0)
    return times


def quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def table(r: dict[str, Any]) -> str:
    m = r["metric"]
    lines = [f"{r['task']} ({r['model']}, {r['method']}): {r['test_examples']} test examples, "
             f"latency: median of {r['rounds']} single calls over {r['latency_examples']} inputs",
             f"{'':<11}{'size MiB':>10}{'latency ms':>12}{'x eager':>9}{m:>10}", "-" * 52]
    for k in ("pytorch", "onnx_fp32", "onnx_int8"):
        lines.append(f"{k:<11}{r['size_bytes'][k] / 2**20:>10.1f}{r['latency_ms'][k]:>12.2f}"
                     f"{r['latency_ms'][k] / r['latency_ms']['pytorch']:>9.2f}{r[m][k]:>10.4f}")
    lines.append(f"int8: {r['int8_size_vs_fp32']:.2f}x fp32 size, {r['int8_latency_vs_eager']:.2f}x eager latency, "
                 f"{r['int8_metric_change_points']:+.2f} points {m} vs fp32")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("bench/results/export.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    results = []
    for run in args.runs:
        with tempfile.TemporaryDirectory() as tmp:
            results.append(bench_run(run, args.rounds, args.threads, args.examples, Path(tmp)))
        print(table(results[-1]))
    data = {"results": results, "threads": args.threads, "rounds": args.rounds, "cpu_count": os.cpu_count(),
            "load_average_before": load_before, "load_average_after": os.getloadavg(),
            "ort_spinning": False, "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine()}
    try:
        import onnxruntime

        data["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {args.out} (load average before {load_before[0]:.1f}, after {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
