"""``python -m bench.recommend_segments``: one adapter per user segment vs one shared adapter.

On the recommend task's data (MovieLens-100K, cutoff 0.7, the cached SASRec base with its table grown
for the new items):

1. a shared LoRA (the task's defaults: attention projections + item table, rank 4) trains on every
   user's interactions after the cutoff, then is merged into the base (``merge_and_unload``);
2. one LoRA per age band (under 25, 25-34, 35 and over, from ``ml-100k.user``) on the attention
   projections attaches on top, starting at zero (so each starts as the shared adapter) and trains
   briefly on its own segment's interactions;
3. every test user is scored in **one batch** with per-example routing (``deltatune.routing``: each
   row through its own segment's adapter), and again with no segment adapter (the shared one alone);
   the routed batch is checked against running each segment's adapter on its own rows.

Segment adapters live on the attention layers only: routing follows the batch dimension, and the
item table is also read for every candidate item (a batch of all items), which no per-user route fits.

Reports HR@10 / NDCG@10 / MRR per segment, both ways; writes ``bench/results/recommend_segments.json``.
The goal (issue #15): segment adapters beat the shared adapter on their own segments.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

import deltatune as dt
from deltatune.core.routing import routing
from deltatune.train.config import validate_config
from deltatune.train.interactions import movielens_100k, read_users
from deltatune.train.loop import make_runner
from deltatune.train.recommend import ATTENTION, RecommendTask, held_out, periods, scores
from deltatune.train.sasrec import Pretraining, train_sasrec


def band(age: str) -> str:
    a = int(age)
    return "age_under_25" if a < 25 else "age_25_34" if a < 35 else "age_35_plus"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared-epochs", type=int, default=5)
    parser.add_argument("--segment-epochs", type=int, default=3)
    parser.add_argument("--segment-lr", type=float, default=2e-3)
    parser.add_argument("--shared-lr", type=float, default=5e-3, help="the shared adapter's (the README's figures)")
    parser.add_argument("--out", default="bench/results/recommend_segments.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    task = RecommendTask()
    config = validate_config({"task": "recommend", "method": "lora"})
    p = periods(config)
    splits = task.load_splits(config)
    train = splits.train
    test = task.encode(None, splits.test, config.max_length)
    users = read_users(movielens_100k("user"), "age")
    train_users = held_out(p, config.max_length)["train_users"][:len(train)]
    segment_of_test = [band(users[it["user"]]) for it in test]
    segments = sorted(set(segment_of_test))

    model = task.load_model("sasrec", splits.labels, config)[0]
    dt.attach(model, dt.LoraConfig(target=config.adapter["target"], rank=4, alpha=8.0), "shared")
    torch.manual_seed(0)
    train_sasrec(model, train, Pretraining(epochs=args.shared_epochs, batch_size=64, lr=args.shared_lr, seed=0), log=None)
    model = dt.merge_and_unload(model)
    print(f"shared adapter trained in {time.perf_counter() - t0:.0f} s")

    for s in segments:
        dt.attach(model, dt.LoraConfig(target=ATTENTION, rank=4, alpha=8.0), s)
    for s in segments:
        windows = [w for w, u in zip(train, train_users) if band(users[u]) == s]
        dt.set_active(model, s)  # trains only this segment's adapter
        train_sasrec(model, windows, Pretraining(epochs=args.segment_epochs, batch_size=64, lr=args.segment_lr,
                                                 seed=0), log=None)
        print(f"segment {s}: {len(windows)} training windows")
    model.eval()
    run = make_runner(torch.device("cpu"), "fp32")

    def ranks_with(names: list[str | None]) -> torch.Tensor:
        with torch.inference_mode(), routing(model, names):
            return task.ranks(model, test, 1024, run)

    shared = ranks_with([None] * len(test))
    routed = ranks_with(segment_of_test)
    # The mixed batch equals each segment's adapter run on its own rows.
    for s in segments:
        rows = [i for i, seg in enumerate(segment_of_test) if seg == s]
        with torch.inference_mode(), dt.using(model, s):
            alone = task.ranks(model, [test[i] for i in rows], 1024, run)
        assert torch.equal(alone, routed[rows]), f"routing differs from running segment {s} alone"
    table = {}
    print(f"{'segment':<12} {'users':>5}  {'shared NDCG@10':>14} {'segment NDCG@10':>15}  {'shared HR@10':>12} "
          f"{'segment HR@10':>13}")
    for s in segments:
        rows = torch.tensor([i for i, seg in enumerate(segment_of_test) if seg == s])
        a, b = scores(shared[rows]), scores(routed[rows])
        table[s] = {"users": len(rows), "shared": a, "segment": b, "segment_beats_shared": b["ndcg_10"] > a["ndcg_10"]}
        print(f"{s:<12} {len(rows):>5}  {a['ndcg_10']:>14.4f} {b['ndcg_10']:>15.4f}  {a['hr_10']:>12.4f} "
              f"{b['hr_10']:>13.4f}")
    overall = {"shared": scores(shared), "segment": scores(routed)}
    print(f"{'all':<12} {len(test):>5}  {overall['shared']['ndcg_10']:>14.4f} {overall['segment']['ndcg_10']:>15.4f}")
    record = {"segments": table, "overall": overall, "shared_epochs": args.shared_epochs,
              "segment_epochs": args.segment_epochs, "segment_lr": args.segment_lr, "shared_lr": args.shared_lr,
              "routing_equals_separate_runs": True, "seconds": round(time.perf_counter() - t0, 1),
              "load_average": os.getloadavg(), "goal": "segment adapters beat the shared adapter on their own segments"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
