"""``python -m bench.tune_vs_grid``: ``deltatune tune`` against the full ``compare`` grid on tweet sentiment.

The grid is ``compare --methods all`` (every method at its defaults and suggested learning rate) on
all-MiniLM-L6-v2 with the settings of ``bench.plan_accuracy`` (960 training tweets, one thread), but
``--eval-examples`` (default 1024) tweets for validation and for test: with 256, one point is 2.5
tweets. Its results are read from ``--runs``'s ``compare/compare.json`` if that ran with the same
settings, else trained there first.
``tune`` then searches the same task (methods x their declared settings x a learning-rate scale,
tune's default pruner, ASHA, or ``--pruner``, at its default rungs, no budget) for ``--trials`` trials: with
ASHA a survey of every applicable method to the first rung, the best third continued, then the sampler.

Reported: the best test accuracy of the grid (and, as tune picks, the test accuracy of the grid's
best row by *validation*: picking the best of 17 by test favours the grid), the test accuracy of tune's pick (the trial with the
best *validation* accuracy: tune never looks at test), and the compute each spent: training
examples processed, validation items (each grid row validates once, on the whole split; a tune
trial on a sample at each early rung and on the whole split at its end), both together in training
examples (a validation item at ``FORWARD_SHARE``, a third, of one: the headline share), training
seconds (validations included, on both sides) and wall-clock seconds. Test passes are left out on
both sides (a measurement, not a search). With ``--seeds 0,1,2`` tune runs once per sampler seed and
the gap and the shares are given as mean +- standard error. Goals: within 1 point of the grid's best
row for at most 30 % of its compute. Writes ``bench/results/tune_vs_grid.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench.plan_accuracy import SETUPS  # noqa: E402


def settings(eval_examples: int) -> list[str]:
    """``bench.plan_accuracy``'s MiniLM settings with ``eval_examples`` for validation and for test."""
    return [o for o in SETUPS["minilm"] if not o.startswith("data.max_eval_examples=")] + [
        f"data.max_eval_examples={eval_examples}"]


def grid(runs: Path, overrides: list[str]) -> dict[str, Any]:
    saved = runs / "compare" / "compare.json"
    if saved.is_file():
        g = json.loads(saved.read_text())
        if sorted(g["overrides"]) == sorted(overrides):
            return g
        print(f"{saved} ran with {g['overrides']}, not {overrides}: running the grid again")
    from deltatune.train.compare import run_comparison

    return run_comparison("all", runs / "compare", overrides, isolate=True)


def validation_accuracy(row: dict[str, Any]) -> float:
    return row["metrics"]["validation"][-1]["accuracy"]


def grid_summary(g: dict[str, Any]) -> dict[str, Any]:
    """The grid's best row (by test and, as tune picks, by validation) and the compute it spent."""
    ok = [r for r in g["rows"] if r["status"] == "ok"]
    best_row = max(ok, key=lambda r: r["accuracy"])
    by_validation = max(ok, key=validation_accuracy)
    return {"best_method": best_row["method"], "best_test_accuracy": best_row["accuracy"],
            "best_by_validation": {"method": by_validation["method"], "test_accuracy": by_validation["accuracy"],
                                   "validation_accuracy": validation_accuracy(by_validation)},
            "test_accuracy": {r["method"]: r["accuracy"] for r in ok},
            "rows": len(ok), "validations": sum(len(r["metrics"]["validation"]) for r in ok),
            "examples": sum(round(r["metrics"]["examples_per_second"] * r["train_seconds"]) for r in ok),
            "train_seconds": round(sum(r["train_seconds"] for r in ok), 1), "wall_seconds": g["seconds"],
            "splits": g.get("splits")}


def recorded_grid(path: Path, overrides: list[str]) -> dict[str, Any] | None:
    """The grid summary a previous run of this bench recorded in ``path``, if it ran with ``overrides``
    (the grid's runs are deterministic in their settings, and its 30 minutes need not be spent again)."""
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    if sorted(saved.get("settings", [])) != sorted(overrides) or "grid" not in saved:
        return None
    return {**saved["grid"], "recorded_in": str(path), "recorded_splits": saved.get("splits")}


def mean_se(values: list[float]) -> dict[str, float]:
    n = len(values)
    mean = sum(values) / n
    se = round((sum((v - mean) ** 2 for v in values) / (n - 1) / n) ** 0.5, 4) if n > 1 else None
    return {"mean": round(mean, 4), "se": se, "n": n}


def one_tune(overrides: list[str], trials: int, tune_dir: Path, pruner: str, seed: int, fresh: bool,
             best_row: dict[str, Any], by_validation: dict[str, Any], grid_cost: dict[str, float]) -> dict[str, Any]:
    from deltatune.train.tune import run_tune

    if fresh:
        shutil.rmtree(tune_dir, ignore_errors=True)
    t0, c0 = time.time(), time.process_time()
    t = run_tune(overrides, "all", None, trials=trials, output=tune_dir, pruner=pruner, seed=seed)
    wall, cpu = time.time() - t0, time.process_time() - c0
    best, spent = t["best"], t["compute"]
    run = {"seed": seed, "pick": best["label"], "lr": best["lr"], "validation_accuracy": best["value"],
           "test_accuracy": best["test_metric"], "examples": spent["examples"],
           "validation_examples": spent["validation_examples"], "example_equivalents": spent["example_equivalents"],
           "train_seconds": spent["train_seconds"], "wall_seconds": round(wall, 1), "process_cpu_seconds": round(cpu, 1),
           "states": [r["state"] for r in t["trials"]], "labels": [r["label"] for r in t["trials"]],
           "values": [r["value"] for r in t["trials"]], "not_applicable": sorted(t.get("not_applicable") or {}),
           "validations": sum(r["validations"] or 0 for r in t["trials"])}
    run["gap_points"] = round(100 * (best_row["accuracy"] - best["test_metric"]), 2)
    run["gap_points_to_best_by_validation"] = round(100 * (by_validation["accuracy"] - best["test_metric"]), 2)
    for key in ("example_equivalents", "examples", "train_seconds"):
        run[f"compute_share_{key}"] = round(run[key] / grid_cost[key], 3)
    print(f"seed {seed}: tune pick {best['label']} lr {best['lr']:.3g}: test {best['test_metric']:.4f} "
          f"(validation {best['value']:.4f}); gap {run['gap_points']:+.2f} points; "
          f"{run['compute_share_example_equivalents']:.0%} of the grid's compute with validations "
          f"({run['compute_share_examples']:.0%} of its training examples, {run['compute_share_train_seconds']:.0%} "
          f"of its training seconds)", flush=True)
    return run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--seeds", default="0", help="tune's sampler seeds, one search each (e.g. 0,1,2)")
    parser.add_argument("--eval-examples", type=int, default=1024, help="validation and test tweets (each)")
    parser.add_argument("--runs", type=Path, default=Path("runs/bench-tune/grid"))
    parser.add_argument("--tune-dir", type=Path, default=Path("runs/bench-tune/minilm"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/tune_vs_grid.json"))
    parser.add_argument("--pruner", default=None, help="tune's --pruner (default: tune's own)")
    parser.add_argument("--fresh", action="store_true", help="start new studies (else existing ones continue)")
    parser.add_argument("--grid-from", type=Path, default=Path("bench/results/tune_vs_grid.json"),
                        help="use the grid recorded here when --runs holds none and the settings match")
    args = parser.parse_args(argv)
    from deltatune.train.tune import DEFAULT_PRUNER, FORWARD_SHARE

    overrides = settings(args.eval_examples)
    summary = None
    if not (args.runs / "compare" / "compare.json").is_file() and args.grid_from:
        summary = recorded_grid(args.grid_from, overrides)
        if summary:
            print(f"the grid: as recorded in {args.grid_from} (same settings)")
    if summary is None:
        summary = grid_summary(grid(args.runs, overrides))
    if "validations" not in summary:  # recorded before validations were counted: compare validates each
        summary["validations"] = summary["rows"]  # row once, at its one epoch's end (eval_every 300 > 30 steps)
        summary["validations_assumed"] = "one per row: compare ran 1 epoch of 30 steps with eval_every 300"
    validation_items = (summary.get("splits") or summary.get("recorded_splits"))["validation"]
    summary["validation_examples"] = summary["validations"] * validation_items
    summary["example_equivalents"] = round(summary["examples"] + FORWARD_SHARE * summary["validation_examples"])
    best_row = {"method": summary["best_method"], "accuracy": summary["best_test_accuracy"]}
    by_validation = {"method": summary["best_by_validation"]["method"],
                     "accuracy": summary["best_by_validation"]["test_accuracy"]}
    pruner = args.pruner or DEFAULT_PRUNER
    seeds = [int(s) for s in args.seeds.split(",")]
    before = json.loads(args.out.read_text()) if args.out.is_file() else None  # for the README's before/after
    runs: list[dict[str, Any]] = []
    for seed in seeds:  # the JSON is rewritten after each seed: an interrupted bench keeps what finished
        runs.append(one_tune(overrides, args.trials, args.tune_dir / f"seed-{seed}" if len(seeds) > 1 else args.tune_dir,
                             pruner, seed, args.fresh, best_row, by_validation, summary))
        result = write(args, overrides, pruner, seeds, summary, runs, before)
    s = result["summary"]
    print(f"grid best: {best_row['method']} {best_row['accuracy']:.4f} ({summary['rows']} runs, "
          f"{summary['examples']:,} examples + {summary['validation_examples']:,} validation items = "
          f"{summary['example_equivalents']:,} example equivalents, {summary['train_seconds']:.0f} s training)")
    print(f"tune over {len(runs)} seed(s): gap {s['gap_points']['mean']:+.2f} +- {s['gap_points']['se'] or 0:.2f} points, "
          f"compute {s['compute_share_example_equivalents']['mean']:.1%} +- {s['compute_share_example_equivalents']['se'] or 0:.1%} "
          f"of the grid's (validations counted)")


def write(args: argparse.Namespace, overrides: list[str], pruner: str, seeds: list[int], summary: dict[str, Any],
          runs: list[dict[str, Any]], before: dict[str, Any] | None) -> dict[str, Any]:
    from deltatune.train.tune import DEFAULT_RUNGS, EARLY_VALIDATION, FORWARD_SHARE, SURVEY_VALIDATION

    result = {
        "settings": overrides, "trials": args.trials, "pruner": pruner, "rungs": DEFAULT_RUNGS,
        "early_validation": EARLY_VALIDATION, "survey_validation": SURVEY_VALIDATION, "forward_share": round(FORWARD_SHARE, 4), "seeds": seeds,
        "splits": summary.get("splits") or summary.get("recorded_splits"),
        "grid": summary, "tune_runs": runs, "seeds_done": len(runs),
        "summary": {k: mean_se([r[k] for r in runs]) for k in (
            "gap_points", "gap_points_to_best_by_validation", "compute_share_example_equivalents",
            "compute_share_examples", "compute_share_train_seconds", "test_accuracy")},
        "load_average": os.getloadavg(),
    }
    if before:
        result["previous_run"] = {k: before.get(k) for k in (
            "trials", "pruner", "rungs", "seeds", "tune", "tune_runs", "summary", "gap_points", "compute_share_examples",
            "compute_share_train_seconds", "load_average") if k in before}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
