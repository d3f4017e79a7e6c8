"""``python -m bench.recommend_sweep_report``: the LoRA goal from ``bench/results/recommend_sweep.json``.

Every setting with 3 seeds is read at epoch ``--epoch`` (10, the task's budget; a constant-rate run of 12
epochs is read at its 10th, which is exactly a 10-epoch constant run). Per family (full fine-tuning;
LoRA with <= 5 % trainable) the setting with the best mean **validation** NDCG@10 is chosen, and its mean
test gain over the unadapted base is compared: LoRA's share of full fine-tuning's gain. Also printed:
every setting's line, and the paired difference over test users (seed-averaged per-user NDCG@10) between
two settings whose stored ranks are at the same epoch (``test_ranks_last``: each run's last epoch).
Writes the result into the sweep's JSON under ``goal``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Any


def per_user(runs: list[dict[str, Any]]) -> list[float]:
    """Seed-averaged per-user NDCG@10 of the runs' last-epoch test ranks."""
    rows = [[1.0 / math.log2(r + 2.0) if r < 10 else 0.0 for r in run["test_ranks_last"]] for run in runs]
    return [statistics.fmean(col) for col in zip(*rows)]


def settings(record: dict[str, Any], epoch: int) -> list[dict[str, Any]]:
    out = []
    for key, s in record["summary"].items():
        if len(s["seeds"]) < 3 or s["epochs"] < epoch or (s["schedule"] != "constant" and s["epochs"] != epoch):
            continue
        row = s["by_epoch"][epoch - 1]
        family = "full" if s["preset"].startswith("full") else "lora"
        out.append({"setting": key, "preset": s["preset"], "family": family,
                    "trainable_share": s["trainable_share"], "val": (row["val_ndcg_10"], row["val_se"]),
                    "gain": (row["test_gain"], row["test_se"]), "epochs": s["epochs"], "schedule": s["schedule"]})
    return sorted(out, key=lambda r: -r["val"][0])


def paired(record: dict[str, Any], a: str, b: str) -> dict[str, float]:
    """Mean and standard error over test users of (b - a), seed-averaged, at each run's last epoch."""
    def pick(key: str) -> list[dict[str, Any]]:
        return [r for r in record["runs"] if f"{r['preset']} {r['epochs']} epochs {r['schedule']}" == key]

    d = [y - x for x, y in zip(per_user(pick(a)), per_user(pick(b)))]
    return {"mean": statistics.fmean(d), "se": statistics.stdev(d) / math.sqrt(len(d))}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", default="bench/results/recommend_sweep.json")
    parser.add_argument("--epoch", type=int, default=10)
    parser.add_argument("--pairs", default="", help="'A|B;C|D': settings (summary keys) to compare per user")
    args = parser.parse_args(argv)
    path = Path(args.sweep)
    record = json.loads(path.read_text())
    rows = settings(record, args.epoch)
    for r in rows:
        print(f"val {r['val'][0]:.4f} ± {r['val'][1]:.4f}  test gain {r['gain'][0]:+.4f} ± {r['gain'][1]:.4f}  "
              f"{100 * r['trainable_share']:.1f} %  {r['setting']}")
    full = next(r for r in rows if r["family"] == "full")
    lora = next(r for r in rows if r["family"] == "lora" and r["trainable_share"] <= 0.05)
    goal = {"epoch": args.epoch, "full": full, "lora": lora, "share": lora["gain"][0] / full["gain"][0],
            "all": rows, "paired": {}}
    for pair in filter(None, args.pairs.split(";")):
        a, b = pair.split("|")
        goal["paired"][f"{b} minus {a}"] = paired(record, a, b)
    print(f"validation-chosen full: {full['setting']} gain {full['gain'][0]:+.4f}; LoRA: {lora['setting']} "
          f"gain {lora['gain'][0]:+.4f}: {100 * goal['share']:.0f} % of full's")
    print(json.dumps(goal["paired"], indent=1))
    record["goal"] = goal
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(path)


if __name__ == "__main__":
    main()
