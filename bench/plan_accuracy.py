"""``python -m bench.plan_accuracy``: ``deltatune plan``'s predictions against measured runs, every method.

For each model (all-MiniLM-L6-v2 on the tweet-sentiment task, SmolLM2-135M on the chat task, both
on a reduced training set so a run takes seconds) this runs, in one session:

1. per method, ``plan`` at its defaults (a few probe steps);
2. ``compare`` of that one method with the same settings: trained in a fresh process, as
   ``deltatune train`` would, reporting its peak memory (process peak RSS on CPU) and its mean
   step time (``train_seconds / steps``), right after its probe (so both see the same load);

and reports predicted / measured for peak memory and step time per method, against the goals
(memory within 15 %, step time within 30 %). Step time is compared twice: as wall time (the goal's
measure; on a shared machine it moves with the load, which can change between probe and run) and
as the process's CPU time per step (the step's work, load aside), with the CPU share (CPU / wall)
and load average of each side. Writes ``bench/results/plan_accuracy.json``.
The compare results (``runs/bench-plan/<model>/compare``) double as the grid for
``bench.tune_vs_grid``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SETUPS: dict[str, list[str]] = {
    # threads=1: on a shared, oversubscribed machine two OpenMP threads mostly wait for each other
    "minilm": ["task=sentiment", "data.max_train_examples=960", "data.max_eval_examples=256", "threads=1"],
    "smollm2": ["task=chat", "data.max_train_examples=96", "data.max_eval_examples=16", "threads=1"],
}
GOALS = {"memory": 0.15, "step": 0.30}


def collected(out: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """``--collect``: the plans and whichever compare runs have finished so far (an interrupted bench)."""
    rows, measured = [], {}
    for plan_file in sorted((out / "plan").glob("*/plan.json")):
        rows += json.loads(plan_file.read_text())["rows"]
    for metrics_file in sorted((out / "compare").glob("*/*/metrics.json")):
        m = json.loads(metrics_file.read_text())
        measured[metrics_file.parent.name] = {"status": "ok", "metrics": m, **{
            k: m[k] for k in ("trainable_parameters", "adapter_bytes", "peak_memory_mb", "train_seconds")}}
    return {"rows": rows}, measured


def measure(name: str, out: Path, steps: int, methods: list[str], collect: bool = False) -> dict[str, Any]:
    """Per method, the plan's probe and then the real run, before the next method: the two see the
    same machine load (minutes apart at most), which matters on a shared machine."""
    from deltatune.train.compare import run_comparison

    overrides = SETUPS[name]
    t0 = time.time()
    if not collect:
        for method in methods:  # plan in a fresh process, as a user runs it: its baseline is a new process's
            subprocess.run([sys.executable, "-m", "deltatune", "plan", "--methods", method, "--variants", "defaults",
                            "--steps", str(steps), "--output", str(out / "plan" / method),
                            *[arg for o in overrides for arg in ("--set", o)]], check=False)
            run_comparison([method], out / "compare" / method, overrides, isolate=True)
    plan, measured = collected(out)
    compare = {"seconds": None}
    plan_seconds = time.time() - t0
    rows = []
    for p in plan["rows"]:
        m = measured.get(p["method"])
        if p["status"] != "ok" or m is None or m["status"] != "ok":
            rows.append({"method": p["method"], "status": "skipped",
                         "why": p.get("error") or (m or {}).get("error") or "not measured (bench interrupted)"})
            continue
        rows.append(compare_row(p, m))
    ok = [r for r in rows if r["status"] == "ok"]
    timed = [r for r in ok if r.get("step_cpu_ratio") is not None]
    return {
        "step_cpu_within_goal": sum(abs(r["step_cpu_ratio"] - 1) <= GOALS["step"] for r in timed),
        "step_cpu_measured": len(timed),
        "overrides": overrides, "probe_steps": steps, "plan_seconds": round(plan_seconds, 1),
        "grid_seconds": compare["seconds"], "rows": rows,
        "memory_within_goal": sum(abs(r["memory_ratio"] - 1) <= GOALS["memory"] for r in ok),
        "step_within_goal": sum(abs(r["step_ratio"] - 1) <= GOALS["step"] for r in ok), "measured": len(ok),
        "steps_total_within_goal": sum(abs(r["steps_total_ratio"] - 1) <= GOALS["step"]
                                       for r in ok if r.get("steps_total_ratio") is not None),
    }


def measured_step(metrics: dict[str, Any]) -> tuple[float, str]:
    """The run's steady step time and what it counts: the mean of its steps after the first, which is
    what plan's ``step_seconds`` predicts (the first step's one-off cost is predicted on its own,
    ``first_step_extra_seconds``, and compared in the run's total). ``train_seconds`` also counts
    validation, which plan's step time leaves out; runs without ``step_times`` give that, marked."""
    times = metrics.get("step_times")
    if times:
        return times["mean_after_first"], "mean of the steps after the first"
    return metrics["train_seconds"] / metrics["steps"], "train_seconds / steps (validation included)"


def steps_total(metrics: dict[str, Any], key: str = "step_times") -> float | None:
    """The run's steps alone, first included (seconds): what plan's ``train_seconds`` predicts."""
    times = metrics.get(key)
    if not times:
        return None
    return times["first"] + times["mean_after_first"] * (metrics["steps"] - 1)


def compare_row(p: dict[str, Any], m: dict[str, Any]) -> dict[str, Any]:
    """Predicted against measured for one method: ``p`` its plan row, ``m`` its run."""
    step, counted = measured_step(m["metrics"])
    total = steps_total(m["metrics"])
    steps = m["metrics"]["steps"]
    extra = p.get("first_step_extra_seconds")
    predicted_total = p["step_seconds"] * steps + (extra or 0.0)  # the run's steps, as plan's train_seconds
    return {
        "method": p["method"], "status": "ok",
        "params_exact": p["trainable_parameters"] == m["trainable_parameters"],
        "adapter_bytes_predicted": p["adapter_bytes"], "adapter_bytes_measured": m["adapter_bytes"],
        "memory_predicted_mb": p["peak_memory_mb"], "memory_measured_mb": m["peak_memory_mb"],
        "memory_ratio": p["peak_memory_mb"] / m["peak_memory_mb"],
        "step_predicted_s": p["step_seconds"], "step_measured_s": step, "step_measured_counts": counted,
        "step_ratio": p["step_seconds"] / step,
        "step_measured_with_validation_s": m["metrics"]["train_seconds"] / steps,
        "first_step_extra_predicted_s": extra,
        "steps_total_predicted_s": predicted_total, "steps_total_measured_s": total,
        "steps_total_ratio": predicted_total / total if total else None,
        "train_predicted_s": p["train_seconds"], "train_measured_s": m["train_seconds"],
        **cpu_columns(p, m["metrics"]),
    }


def cpu_columns(plan_row: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    """Step time as CPU seconds (the step's work, whatever else ran on the machine) predicted and
    measured, the CPU share each side got (CPU / wall: how loaded the machine was), the load average
    at each end, and the run's first step. The measured CPU step is, as the wall one, the mean after
    the first step where the run recorded each step's CPU time (``step_cpu_times``), else the whole
    run's CPU time per step (first included, ``step_cpu_counts`` says which). Runs and plans from
    before CPU time was recorded give ``None``."""
    cpu = metrics.get("train_cpu_seconds")
    per_step = metrics.get("step_cpu_times")
    if per_step:
        measured, counts = per_step["mean_after_first"], "mean of the steps after the first"
    else:
        measured, counts = (cpu / metrics["steps"] if cpu is not None else None), "train_cpu_seconds / steps"
    predicted = plan_row.get("step_cpu_seconds")
    times = metrics.get("step_times") or {}
    return {
        "step_cpu_predicted_s": predicted, "step_cpu_measured_s": measured, "step_cpu_counts": counts,
        "step_cpu_ratio": predicted / measured if predicted and measured else None,
        "first_step_extra_cpu_predicted_s": plan_row.get("first_step_extra_cpu_seconds"),
        "step_cpu_measured_first_s": (per_step or {}).get("first"),
        "cpu_share_probe": plan_row.get("cpu_share"),
        "cpu_share_run": round(cpu / metrics["train_seconds"], 3) if cpu is not None else None,
        "load_average_probe": plan_row.get("load_average"), "load_average_run": metrics.get("load_average"),
        "step_measured_first_s": times.get("first"), "step_measured_after_first_s": times.get("mean_after_first"),
    }


def table(name: str, result: dict[str, Any]) -> str:
    lines = [f"{name}: memory within 15 %: {result['memory_within_goal']}/{result['measured']}, "
             f"step time within 30 %: {result['step_within_goal']}/{result['measured']} (wall), "
             f"{result.get('step_cpu_within_goal')}/{result.get('step_cpu_measured')} (CPU)",
             f"{'method':10} {'params':>6} {'mem pred':>9} {'mem meas':>9} {'ratio':>6} {'step pred':>10} "
             f"{'step meas':>10} {'ratio':>6} {'cpu pred':>9} {'cpu meas':>9} {'ratio':>6} {'share p/r':>10}"]
    for r in result["rows"]:
        if r["status"] != "ok":
            lines.append(f"{r['method']:10} skipped: {r['why']}")
            continue
        lines.append(f"{r['method']:10} {'exact' if r['params_exact'] else 'DIFF':>6} {r['memory_predicted_mb']:>7.0f}MB "
                     f"{r['memory_measured_mb']:>7.0f}MB {r['memory_ratio']:>6.2f} {r['step_predicted_s']:>9.3f}s "
                     f"{r['step_measured_s']:>9.3f}s {r['step_ratio']:>6.2f}" + _cpu_cells(r))
    return "\n".join(lines)


def _cpu_cells(r: dict[str, Any]) -> str:
    if r.get("step_cpu_ratio") is None:
        return ""
    return (f" {r['step_cpu_predicted_s']:>8.3f}s {r['step_cpu_measured_s']:>8.3f}s {r['step_cpu_ratio']:>6.2f}"
            f" {r['cpu_share_probe']:>4.2f}/{r['cpu_share_run']:.2f}")


def cpu_model() -> str | None:
    """The processor (Linux: ``/proc/cpuinfo``), so figures from different machines stay apart."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or None
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    name = fields.get("model name")  # a virtual machine may name only the make: add family and model
    return name and f"{name} (family {fields.get('cpu family')}, model {fields.get('model')})"


def main(argv: list[str] | None = None) -> None:
    from deltatune.train.space import parse_methods

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="minilm,smollm2")
    parser.add_argument("--steps", type=int, default=4, help="timed probe steps per method")
    parser.add_argument("--methods", default="all", help="comma-separated methods, or 'all'")
    parser.add_argument("--runs", type=Path, default=Path("runs/bench-plan"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/plan_accuracy.json"))
    parser.add_argument("--collect", action="store_true",
                        help="report from the plan and the compare runs already in --runs (no training)")
    args = parser.parse_args(argv)
    results: dict[str, Any] = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results["machine"] = {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
                          "load_average_before": os.getloadavg()}
    for name in args.models.split(","):
        results[name] = measure(name, args.runs / name, args.steps, parse_methods(args.methods), args.collect)
        results["machine"]["load_average_after"] = os.getloadavg()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")  # after each model: a partial run keeps its figures
        print(table(name, results[name]), flush=True)


if __name__ == "__main__":
    main()
