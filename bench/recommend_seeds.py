"""``python -m bench.recommend_seeds``: ``deltatune compare --set task=recommend`` over several seeds.

One NDCG@10 on MovieLens-100K's 401 test users has a standard error of about 0.01, and a single seed's
difference between two methods is mostly noise. This runs the same compare once per seed (the seed moves
the adapter's initialisation, the batch order and dropout; the base, the split and the test users stay
the same), one after another, then reports per method the mean and standard error over seeds of HR@10,
NDCG@10, MRR and the NDCG@10 gain over the unadapted base, and each method's share of full
fine-tuning's gain (the issue's goal: LoRA >= 90 % of it with <= 5 % trainable).

Seed 0's compare is also written as ``bench/results/recommend_compare.json`` (the README's
``deltatune compare`` table); the aggregate goes to ``bench/results/recommend_compare_seeds.json``.
``--aggregate`` only re-reads the compare folders a previous run left.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.recommend_common import pm

METHODS = "full,lora,tokens,bitfit,hybrid"


def mean_se(values: list[float]) -> dict[str, float]:
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return {"mean": statistics.fmean(values), "se": se}


def aggregate(results: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Per method: mean and standard error over seeds of each score and of the NDCG@10 gain."""
    any_result = next(iter(results.values()))
    base = any_result["rows"][0]["metrics"]["test_base_ndcg_10"]
    methods: dict[str, Any] = {}
    for row in any_result["rows"]:
        name = row["method"]
        per_seed = {seed: next(r for r in res["rows"] if r["method"] == name) for seed, res in results.items()}
        ok = {seed: r for seed, r in per_seed.items() if r["status"] == "ok"}
        if not ok:
            continue
        scores = {k: mean_se([r["scores"][k] for r in ok.values()]) for k in ("hr_10", "ndcg_10", "mrr")}
        gains = [r["metrics"]["test_ndcg_10"] - r["metrics"]["test_base_ndcg_10"] for r in ok.values()]
        methods[name] = {"seeds": sorted(ok), "lr": row["lr"], "trainable_parameters": row["trainable_parameters"],
                         "trainable_share": row["trainable_share"], "adapter_bytes": row["adapter_bytes"],
                         "scores": scores, "ndcg_10_gain": mean_se(gains),
                         "ndcg_10_gain_per_seed": dict(zip(sorted(ok), gains))}
    full = methods.get("full", {}).get("ndcg_10_gain", {}).get("mean")
    for m in methods.values():
        m["share_of_full_gain"] = m["ndcg_10_gain"]["mean"] / full if full else None
    base_scores = {k: any_result["rows"][0]["metrics"][f"test_base_{k}"] for k in ("hr_10", "ndcg_10", "mrr")}
    return {"base": base_scores, "methods": methods, "test_users": any_result["rows"][0]["metrics"]["test_users"],
            "seeds": sorted(results), "epochs": any_result["shared"]["epochs"], "base_ndcg_10": base}


def markdown(agg: dict[str, Any]) -> str:
    b = agg["base"]
    lines = ["| method | HR@10 | NDCG@10 | MRR | NDCG@10 gain | share of full's gain | trainable | lr |",
             "|:--|--:|--:|--:|--:|--:|--:|--:|",
             f"| unadapted base | {b['hr_10']:.4f} | {b['ndcg_10']:.4f} | {b['mrr']:.4f} | — | — | 0 | — |"]
    for name, m in agg["methods"].items():
        s = m["scores"]
        share = "—" if name == "full" or m["share_of_full_gain"] is None else f"{100 * m['share_of_full_gain']:.0f} %"
        lines.append(f"| {name} | {pm(s['hr_10'])} | {pm(s['ndcg_10'])} | {pm(s['mrr'])} | "
                     f"{pm(m['ndcg_10_gain'], True)} | {share} | "
                     f"{m['trainable_parameters']:,} ({100 * m['trainable_share']:.1f} %) | {m['lr']:g} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", default=METHODS)
    parser.add_argument("--runs", default="runs/recommend-seeds", help="one compare folder per seed under here")
    parser.add_argument("--aggregate", action="store_true", help="only aggregate the compare folders already there")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="extra --set for every compare")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    runs = Path(args.runs)
    results = {}
    for seed in seeds:
        folder = runs / f"seed{seed}"
        if not args.aggregate:
            cmd = [sys.executable, "-m", "deltatune", "compare", "--methods", args.methods, "--set", "task=recommend",
                   "--set", "threads=1", "--set", f"seed={seed}", *[x for s in args.sets for x in ("--set", s)],
                   "--output", str(folder)]
            print(" ".join(cmd), flush=True)
            subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        results[seed] = json.loads((folder / "compare.json").read_text())
    agg = aggregate(results)
    agg["load_average"] = os.getloadavg()
    table = markdown(agg)
    agg["table"] = table
    print(table)
    out = Path("bench/results")
    out.mkdir(parents=True, exist_ok=True)
    (out / "recommend_compare_seeds.json").write_text(json.dumps(agg, indent=1) + "\n")
    if 0 in results:
        shutil.copyfile(runs / "seed0" / "compare.json", out / "recommend_compare.json")
    print(f"wrote {out / 'recommend_compare_seeds.json'}")


if __name__ == "__main__":
    main()
