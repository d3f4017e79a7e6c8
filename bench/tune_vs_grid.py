"""``python -m bench.tune_vs_grid``: ``deltatune tune`` against the full ``compare`` grid on tweet sentiment.

The grid is ``compare --methods all`` (every method at its defaults and suggested learning rate) on
all-MiniLM-L6-v2 with the settings of ``bench.plan_accuracy`` (960 training tweets, one thread), but
``--eval-examples`` (default 1024) tweets for validation and for test: with 256, one point is 2.5
tweets. Its results are read from ``--runs``'s ``compare/compare.json`` if that ran with the same
settings, else trained there first.
``tune`` then searches the same task (methods x their declared settings x a learning-rate scale,
tune's default pruner, ASHA, or ``--pruner``, at its default 3 validations per run, no budget) for ``--trials`` trials.

Reported: the best test accuracy of the grid (and, as tune picks, the test accuracy of the grid's
best row by *validation*: picking the best of 17 by test favours the grid), the test accuracy of tune's pick (the trial with the
best *validation* accuracy: tune never looks at test), and the compute each spent: training
examples processed, training seconds, and wall-clock seconds. Goals: within 1 point of the grid's
best row for at most 30 % of its compute. Writes ``bench/results/tune_vs_grid.json``.
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
            "rows": len(ok), "examples": sum(round(r["metrics"]["examples_per_second"] * r["train_seconds"]) for r in ok),
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--eval-examples", type=int, default=1024, help="validation and test tweets (each)")
    parser.add_argument("--runs", type=Path, default=Path("runs/bench-tune/grid"))
    parser.add_argument("--tune-dir", type=Path, default=Path("runs/bench-tune/minilm"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/tune_vs_grid.json"))
    parser.add_argument("--pruner", default=None, help="tune's --pruner (default: tune's own)")
    parser.add_argument("--fresh", action="store_true", help="start a new study (else an existing one continues)")
    parser.add_argument("--grid-from", type=Path, default=Path("bench/results/tune_vs_grid.json"),
                        help="use the grid recorded here when --runs holds none and the settings match")
    args = parser.parse_args(argv)
    from deltatune.train.tune import DEFAULT_PRUNER, DEFAULT_RUNGS, run_tune

    overrides = settings(args.eval_examples)
    summary = None
    if not (args.runs / "compare" / "compare.json").is_file() and args.grid_from:
        summary = recorded_grid(args.grid_from, overrides)
        if summary:
            print(f"the grid: as recorded in {args.grid_from} (same settings)")
    if summary is None:
        summary = grid_summary(grid(args.runs, overrides))
    best_row = {"method": summary["best_method"], "accuracy": summary["best_test_accuracy"]}
    by_validation = {"method": summary["best_by_validation"]["method"],
                     "accuracy": summary["best_by_validation"]["test_accuracy"]}
    grid_examples, grid_train = summary["examples"], summary["train_seconds"]
    if args.fresh:
        shutil.rmtree(args.tune_dir, ignore_errors=True)
    t0 = time.time()
    pruner = args.pruner or DEFAULT_PRUNER
    t = run_tune(overrides, "all", None, trials=args.trials, output=args.tune_dir, pruner=pruner)
    wall = time.time() - t0
    best = t["best"]
    result = {
        "settings": overrides, "trials": args.trials, "pruner": pruner, "rungs": DEFAULT_RUNGS,
        "splits": summary.get("splits") or summary.get("recorded_splits"),
        "grid": summary,
        "tune": {"pick": best["label"], "lr": best["lr"], "validation_accuracy": best["value"],
                 "test_accuracy": best["test_metric"], "examples": t["compute"]["examples"],
                 "train_seconds": t["compute"]["train_seconds"], "wall_seconds": round(wall, 1),
                 "states": [r["state"] for r in t["trials"]],
                 "validations": sum(r["validations"] or 0 for r in t["trials"])},  # each of the validation split
    }
    result["gap_points"] = round(100 * (best_row["accuracy"] - best["test_metric"]), 2)
    result["gap_points_to_best_by_validation"] = round(100 * (by_validation["accuracy"] - best["test_metric"]), 2)
    result["compute_share_examples"] = round(t["compute"]["examples"] / grid_examples, 3)
    result["compute_share_train_seconds"] = round(t["compute"]["train_seconds"] / grid_train, 3)
    result["load_average"] = os.getloadavg()
    if args.out.is_file():  # the run before, for the README's before/after
        before = json.loads(args.out.read_text())
        result["previous_run"] = {k: before.get(k) for k in (
            "trials", "pruner", "rungs", "tune", "gap_points", "compute_share_examples", "compute_share_train_seconds",
            "load_average")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"grid best: {best_row['method']} {best_row['accuracy']:.4f} ({summary['rows']} runs, {grid_examples:,} examples, "
          f"{grid_train:.0f} s training)")
    print(f"grid best by validation: {by_validation['method']} test {by_validation['accuracy']:.4f}")
    print(f"tune pick: {best['label']} lr {best['lr']:.3g}: test {best['test_metric']:.4f} "
          f"(validation {best['value']:.4f}); {t['compute']['examples']:,} examples "
          f"({result['compute_share_examples']:.0%} of the grid's), {t['compute']['train_seconds']:.0f} s training "
          f"({result['compute_share_train_seconds']:.0%}); gap {result['gap_points']:+.2f} points")


if __name__ == "__main__":
    main()
