"""``python -m bench.recommend_sweep``: tune full fine-tuning and LoRA on the recommend task, over seeds.

Each run is a real ``deltatune train --set task=recommend`` (``run_training``, the task's defaults
except what the run names: method, lr, schedule, epochs, adapter), one after another in this process,
one thread. After every epoch the model is scored on the validation users (the loop does that) and,
by a callback, on the test users, so one run with a constant learning rate gives the whole curve
over epochs (a constant-rate run of ``k`` epochs is exactly the first ``k`` epochs of a longer one).
Settings are chosen on the **validation** mean over seeds; the test figures of that choice are what
the README reports (mean and standard error over seeds, and the gain over the unadapted base).

Writes ``bench/results/recommend_sweep.json`` after every run (a long sweep keeps what it finished).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.measure import write_json
from bench.recommend_common import progress
from deltatune.train.callbacks import Callback, State
from deltatune.train.config import validate_config
from deltatune.train.loop import make_runner
from deltatune.train.recommend import ATTENTION, TABLE, RecommendTask, scores
from deltatune.train.run import run_training

FFN = ["fc1", "fc2"]

#: name -> (method, lr, adapter settings)
PRESETS: dict[str, tuple[str, float, dict[str, Any]]] = {
    "full-3e-4": ("full", 3e-4, {}),
    "full-1e-3": ("full", 1e-3, {}),
    "full-3e-3": ("full", 3e-3, {}),
    "lora-a4t2-5e-3": ("lora", 5e-3, {"target": [*ATTENTION, TABLE], "rank": 4, "alpha": 8.0, "rank_pattern": {TABLE: 2}}),
    "lora-a4t2-1e-2": ("lora", 1e-2, {"target": [*ATTENTION, TABLE], "rank": 4, "alpha": 8.0, "rank_pattern": {TABLE: 2}}),
    "lora-a2t4-5e-3": ("lora", 5e-3, {"target": [*ATTENTION, TABLE], "rank": 2, "alpha": 8.0, "rank_pattern": {TABLE: 4}}),
    "lora-a2t4-1e-2": ("lora", 1e-2, {"target": [*ATTENTION, TABLE], "rank": 2, "alpha": 8.0, "rank_pattern": {TABLE: 4}}),
    "lora-a2t4-2e-2": ("lora", 2e-2, {"target": [*ATTENTION, TABLE], "rank": 2, "alpha": 8.0, "rank_pattern": {TABLE: 4}}),
    # The table alone. (Run in round 2 as "lora-t5-1e-2", rank 5 asked: the task's rank_pattern {table: 4}
    # merged in, so it trained rank 4; the record was renamed to what ran.)
    "lora-t4-1e-2": ("lora", 1e-2, {"target": [TABLE], "rank": 4, "alpha": 8.0, "rank_pattern": {TABLE: 4}}),
    # The table's B starts N(0, 1) (as PEFT's): at alpha 8 one Adam step moves an item's row far more than
    # full fine-tuning's step does; a small alpha on the table brings its step to full fine-tuning's scale.
    "lora-a2t4s05-1e-2": ("lora", 1e-2, {"target": [*ATTENTION, TABLE], "rank": 2, "alpha": 8.0,
                                         "rank_pattern": {TABLE: 4}, "alpha_pattern": {TABLE: 2.0}}),
    "lora-a2t4s0125-1e-2": ("lora", 1e-2, {"target": [*ATTENTION, TABLE], "rank": 2, "alpha": 8.0,
                                           "rank_pattern": {TABLE: 4}, "alpha_pattern": {TABLE: 0.5}}),
    "lora-a2t4s0125-5e-3": ("lora", 5e-3, {"target": [*ATTENTION, TABLE], "rank": 2, "alpha": 8.0,
                                           "rank_pattern": {TABLE: 4}, "alpha_pattern": {TABLE: 0.5}}),
    # Round 2 (the LoRA goal against full fine-tuning tuned on its own): the FFN as a target (rank 1 on
    # attention and FFN at the default's scale alpha/r = 4, rank 4 on the table: 4.7 %), a larger step on the
    # table only (alpha 16 there), and the table alone at rank 5 (4.7 %).
    "lora-a1f1t4-1e-2": ("lora", 1e-2, {"target": [*ATTENTION, *FFN, TABLE], "rank": 1, "alpha": 4.0,
                                        "rank_pattern": {TABLE: 4}, "alpha_pattern": {TABLE: 8.0}}),
    "lora-a2t4s16-1e-2": ("lora", 1e-2, {"target": [*ATTENTION, TABLE], "rank": 2, "alpha": 8.0,
                                         "rank_pattern": {TABLE: 4}, "alpha_pattern": {TABLE: 16.0}}),
}


class TestEachEpoch(Callback):
    """Scores the test users after every epoch (the sweep's curve; training itself never sees it)."""

    def __init__(self, task: RecommendTask, test: list[dict[str, Any]]) -> None:
        self.task, self.test, self.curve = task, test, []
        self.run = make_runner(torch.device("cpu"), "fp32")

    def on_epoch_end(self, s: State) -> None:
        model = s.model
        model.eval()
        ranks = self.task.ranks(model, self.test, 512, self.run)
        model.train()
        self.curve.append({"epoch": s.epoch + 1, **scores(ranks), "ranks": ranks.tolist()})


def mean_se(values: list[float]) -> tuple[float, float]:
    m = statistics.fmean(values)
    return m, (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan"))


def summarise(runs: list[dict[str, Any]], base: float | None) -> dict[str, Any]:
    """Per preset, epochs and schedule, and per epoch: validation and test NDCG@10, mean and standard
    error over seeds, and the test gain over the unadapted base."""
    out: dict[str, Any] = {}
    for key in dict.fromkeys((r["preset"], r["epochs"], r["schedule"]) for r in runs):
        mine = [r for r in runs if (r["preset"], r["epochs"], r["schedule"]) == key]
        epochs = min(len(r["validation"]) for r in mine)
        rows = []
        for e in range(epochs):
            val, test = mean_se([r["validation"][e]["ndcg_10"] for r in mine]), mean_se([r["test"][e]["ndcg_10"] for r in mine])
            rows.append({"epoch": e + 1, "val_ndcg_10": val[0], "val_se": val[1], "test_ndcg_10": test[0],
                         "test_se": test[1], "test_gain": None if base is None else test[0] - base})
        out[f"{key[0]} {key[1]} epochs {key[2]}"] = {
            "preset": key[0], "epochs": key[1], "schedule": key[2], "seeds": [r["seed"] for r in mine],
            "trainable": mine[0]["trainable"], "trainable_share": mine[0]["trainable_share"], "by_epoch": rows}
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="full-1e-3,lora-a4t2-5e-3", help=f"of {', '.join(PRESETS)}")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--schedule", default="constant", choices=["constant", "linear", "cosine"])
    parser.add_argument("--out", default="bench/results/recommend_sweep.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    presets = args.presets.split(",")
    unknown = [p for p in presets if p not in PRESETS]
    if unknown:
        raise SystemExit(f"unknown preset(s) {unknown}; known: {', '.join(PRESETS)}")
    out = Path(args.out)
    record: dict[str, Any] = json.loads(out.read_text()) if out.is_file() else {"runs": []}
    done = {(r["preset"], r["seed"], r["epochs"], r["schedule"]) for r in record["runs"]}
    task = RecommendTask()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in (int(s) for s in args.seeds.split(",")):
            for name in presets:
                if (name, seed, args.epochs, args.schedule) in done:
                    continue
                method, lr, adapter = PRESETS[name]
                config = validate_config({"task": "recommend", "method": method, "lr": lr, "epochs": args.epochs,
                                          "lr_schedule": args.schedule, "seed": seed, "threads": 1,
                                          "output": f"{tmp}/{name}-{seed}", **({"adapter": adapter} if adapter else {})})
                splits = task.load_splits(config)
                callback = TestEachEpoch(task, task.encode(None, splits.test, config.max_length))
                started = time.perf_counter()
                metrics = run_training(config, overwrite=True, progress=False, callbacks=[callback])
                validation = metrics["validation"]  # one row per epoch (the loop validates at each epoch's end)
                record["runs"].append({
                    "preset": name, "method": method, "lr": lr, "adapter": adapter, "seed": seed,
                    "epochs": args.epochs, "schedule": args.schedule,
                    "trainable": metrics["trainable_parameters"],
                    "trainable_share": metrics["trainable_parameters"] / metrics["total_parameters"],
                    "validation": validation,
                    "test": [{k: v for k, v in row.items() if k != "ranks"} for row in callback.curve],
                    "test_ranks_last": callback.curve[-1]["ranks"],
                    "base_test_ndcg_10": metrics["test_base_ndcg_10"], "seconds": round(time.perf_counter() - started, 1)})
                record["base_test_ndcg_10"] = metrics["test_base_ndcg_10"]
                record["summary"] = summarise(record["runs"], record["base_test_ndcg_10"])
                record["load_average"] = os.getloadavg()
                write_json(out, record)
                last = record["runs"][-1]
                progress(f"{name} seed {seed}", last, str([round(v["ndcg_10"], 4) for v in last["test"]]), t0)


if __name__ == "__main__":
    main()
