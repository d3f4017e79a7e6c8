"""``python -m bench.recommend_segments``: one adapter per user segment vs one shared adapter, over seeds.

On the recommend task's data (MovieLens-100K, cutoff 0.7, the cached SASRec base with its table grown
for the new items), once per seed:

1. the shared adapter is the task's own LoRA, trained by a real ``deltatune train --set task=recommend
   --set method=lora`` (``run_training``, the task's defaults: attention rank 2 + item table rank 4,
   lr 1e-2, 10 epochs, linear decay), then merged into the base (``merge_and_unload``);
2. per segmentation (age bands, gender, ...) and per variant, one LoRA per segment (rank 4 on the
   attention projections and the feed-forward layers) attaches on top of that merged model, starting
   at zero, so each starts as the shared adapter. Variants: ``own@LR`` trains on the segment's own
   windows only; ``weightedK@LR`` on every window with the segment's own repeated K times (the others
   keep the shared behaviour in view). Each trains at a constant rate for up to ``--epochs`` epochs with
   **early stopping on the segment's validation users** (epoch 0, the shared adapter alone, included:
   a segment whose validation score never improves keeps a zero adapter);
3. every validation and test user is scored in **one batch** with per-example routing
   (``deltatune.routing``: each row through its own segment's adapter), and with no segment adapter
   (the shared one alone); the routed batch is checked equal to running each segment alone.

Segment adapters live on the attention and feed-forward layers only: routing follows the batch, and the
item table is also read for every candidate item (a batch of all items), which no per-user route fits.

The variant is chosen per segmentation on the **validation** users (the routed validation NDCG@10 minus
the shared one, mean over seeds); the README reports that choice's test figures: per segment, mean ±
standard error over seeds of shared and segment NDCG@10, and the paired difference (over seeds, and over
users on the seed-averaged per-user differences). Writes ``bench/results/recommend_segments.json`` after
every variant (ranks included, so the summary can be recomputed with ``--summarise``).
``--positions 5`` holds out each user's five interactions before the test one for validation (1,899 items
instead of 393; ``data.validation_positions``): the shared and the segment adapters train without them,
and test is read on those models (nothing added back). The summary also reports every variant under the keep
rule (``deltatune.train.segments.keep_segments``: a segment keeps its adapter only when its validation gain,
paired over the segment's validation users, exceeds one standard error; else the shared adapter serves it).
``--test-positions 10`` adds a rolling test (``held_out(..., test_positions=10)``): each user's last ten
interactions, each ranked from its own prefix; the report reads leave-last-out (each user's last item) as the
headline and the rolling view (each user's mean over their items) beside it, and judges "beats" there:
a paired difference over users above ``BEATS`` standard errors. Segmentations: ``age3``, ``age2``,
``gender``, ``occupation3`` (student / technical / other) and ``activity2`` (light / heavy at the median);
by behaviour, ``taste2`` / ``taste3`` (k-means over the genre shares of the histories before the cutoff,
``deltatune.train.segments.taste_segments``; a user is routed by their history before their held-out items)
and ``cohort2`` / ``cohort3`` (when a user joined: before the cutoff or after it, the latter split at the
median into early and late).
The goal (issue #15): segment adapters beat the shared adapter on their own segments.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

import deltatune as dt
from deltatune.core.routing import routing
from deltatune.train.callbacks import Callback, State
from deltatune.train.config import validate_config
from deltatune.train.interactions import movielens_100k, read_items, read_users
from deltatune.train.loop import make_runner
from deltatune.train.recommend import ATTENTION, RecommendTask, held_out, periods, scores
from deltatune.train.run import run_training
from deltatune.train.sasrec import collate
from deltatune.train.segments import taste_segments

from bench.measure import write_json
from bench.recommend_segments_report import summarise

FFN = ["fc1", "fc2"]
#: occupation groups of ml-100k.user (21 occupations; 77 / 87 / 237 of the 401 test users)
TECHNICAL = {"programmer", "engineer", "scientist", "technician"}


def by_column(column: str, rule: Callable[[str], str]) -> Callable[[dict[str, Any]], dict[str, str]]:
    """A segmentation by one column of ``ml-100k.user``: user -> ``rule(value)``."""
    return lambda data: {u: rule(v) for u, v in read_users(movielens_100k("user"), column).items()}


def by_activity(data: dict[str, Any]) -> dict[str, str]:
    """Light and heavy users: how many interactions a user has before their held-out ones (what training
    sees of them), split at the median over the evaluated users (ties heavy)."""
    seen: dict[str, int] = {}
    for it in data["validation"] + data["test"]:
        seen[it["user"]] = min(seen.get(it["user"], len(it["seen"])), len(it["seen"]))
    median = statistics.median(seen.values())
    return {u: "activity_light" if n < median else "activity_heavy" for u, n in seen.items()}


def by_taste(k: int) -> Callable[[dict[str, Any]], dict[str, str]]:
    """Taste segments (``deltatune.train.segments.taste_segments``): k-means over the genre shares
    (``ml-100k.item``'s ``class``) of every user's history **before the cutoff** (the base's training data,
    before the adaptation period); each evaluated user is routed by the genre shares of their history before
    their first held-out item (what training sees of them, never a validation or test item), as a user is
    at prediction time: 269 of the 401 test users arrived after the cutoff, so the past alone cannot route them."""

    def segments(data: dict[str, Any]) -> dict[str, str]:
        p = periods(validate_config({"task": "recommend", "method": "lora"}))
        genres = {item: v.split() for item, v in read_items(movielens_100k("item"), "class").items()}
        past = [[r.item for r in h if r.time < p.cutoff] for h in p.data.histories.values()]
        taste = taste_segments([h for h in past if h], genres, k)
        before: dict[str, list[int]] = {}
        for it in data["validation"] + data["test"]:  # each user's shortest history: before their first held-out item
            if it["user"] not in before or len(it["seen"]) < len(before[it["user"]]):
                before[it["user"]] = it["seen"]
        names = p.names
        route = {u: taste.route(names[row - 1] for row in rows) for u, rows in before.items()}
        if None in route.values():
            raise SystemExit(f"taste{k}: a user's history has no item with a genre; route them to the shared adapter")
        return route  # type: ignore[return-value]

    return segments


def by_cohort(k: int) -> Callable[[dict[str, Any]], dict[str, str]]:
    """Cohorts: when a user joined (their first interaction, part of every history they are served from).
    ``k=2``: before the cutoff (returning) or after it (new); ``k=3`` splits the new users at their median
    join time over the evaluated users (early / late). SASRec sees no timestamps, so when a user arrived,
    and with it which items were new and popular around their own interactions, is not an input of the
    shared model."""

    def segments(data: dict[str, Any]) -> dict[str, str]:
        p = periods(validate_config({"task": "recommend", "method": "lora"}))
        users = {it["user"] for it in data["validation"] + data["test"]}
        joined = {u: p.data.histories[u][0].time for u in users}
        middle = statistics.median(t for t in joined.values() if t >= p.cutoff)
        return {u: "joined_before" if t < p.cutoff else "joined_after" if k == 2 else
                "joined_early" if t < middle else "joined_late" for u, t in joined.items()}

    return segments


#: name -> data -> {user: segment}
SEGMENTATIONS: dict[str, Callable[[dict[str, Any]], dict[str, str]]] = {
    "age3": by_column("age", lambda v: "age_under_25" if int(v) < 25 else "age_25_34" if int(v) < 35 else "age_35_plus"),
    "age2": by_column("age", lambda v: "age_under_30" if int(v) < 30 else "age_30_plus"),
    "gender": by_column("gender", lambda v: f"gender_{v}"),
    "occupation3": by_column("occupation", lambda v: "occ_student" if v == "student" else
                             "occ_technical" if v in TECHNICAL else "occ_other"),
    "activity2": by_activity,
    "taste2": by_taste(2),
    "taste3": by_taste(3),
    "cohort2": by_cohort(2),
    "cohort3": by_cohort(3),
}
RUN = make_runner(torch.device("cpu"), "fp32")


class Keep(Callback):
    """Keeps a copy of the trained model (adapter attached) when the run ends."""

    model: torch.nn.Module | None = None

    def on_end(self, s: State) -> None:
        self.model = copy.deepcopy(s.model)


def shared_model(seed: int, tmp: str, positions: int = 1, users: int | None = None,
                 ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The task's LoRA on its defaults, trained by ``run_training``, merged into the base; ``positions``
    validation interactions per user held out (``data.validation_positions``), never trained on. ``users``
    (the number of test users) cuts the run's own per-epoch validation to that many items
    (``data.max_eval_examples``; test, one item per user, stays whole): it is progress output only, the
    bench scores validation itself, and training does not depend on it."""
    data = {"validation_positions": positions, **({"max_eval_examples": users} if users else {})}
    config = validate_config({"task": "recommend", "method": "lora", "seed": seed, "threads": 1,
                              "data": data, "output": f"{tmp}/shared-{seed}"})
    keep = Keep()
    metrics = run_training(config, overwrite=True, progress=False, callbacks=[keep])
    assert keep.model is not None
    return dt.merge_and_unload(keep.model).eval(), metrics


def ranks_of(task: RecommendTask, model: torch.nn.Module, items: list[dict], route: list[str | None] | None,
             ) -> torch.Tensor:
    """0-based ranks of every item's target in one batch, each row through ``route[row]`` (or the active)."""
    model.eval()
    with torch.inference_mode():
        if route is None:
            return task.ranks(model, items, 4096, RUN)
        with routing(model, route):
            return task.ranks(model, items, 4096, RUN)


def logits_of(model: torch.nn.Module, items: list[dict], route: list[str | None] | None) -> torch.Tensor:
    """Next-item logits (N, items) of every item's history in one batch, each row through ``route[row]``."""
    model.eval()
    batch = collate([(it["input_ids"], [-100] * len(it["input_ids"])) for it in items], max_len=10**9)
    with torch.inference_mode():
        if route is None:
            return RUN(model, {"input_ids": batch["input_ids"]}).logits.float()
        with routing(model, route):
            return RUN(model, {"input_ids": batch["input_ids"]}).logits.float()


def train_segment(task: RecommendTask, model: torch.nn.Module, name: str, windows: list, val: list[dict],
                  lr: float, epochs: int, seed: int) -> dict[str, Any]:
    """Train adapter ``name`` on ``windows`` (AdamW, constant rate, batch 64, clip 1.0), keeping the epoch
    (0 = the zero adapter) with the best NDCG@10 on ``val``, the segment's validation users."""
    dt.set_active(model, name)  # only this adapter is applied and trains
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    generator = torch.Generator().manual_seed(seed)

    def score() -> float:
        return scores(ranks_of(task, model, val, None))["ndcg_10"]

    curve = [score()]
    best = (curve[0], 0, [p.detach().clone() for p in params])
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(windows), generator=generator).tolist()
        for i in range(0, len(order), 64):
            batch = collate([windows[j] for j in order[i:i + 64]], model.spec.max_len)
            loss = model(**batch).loss
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
        curve.append(score())
        if curve[-1] > best[0]:
            best = (curve[-1], epoch, [p.detach().clone() for p in params])
    with torch.no_grad():
        for p, kept in zip(params, best[2]):
            p.copy_(kept)
    return {"val_curve": curve, "best_epoch": best[1], "windows": len(windows)}


def parse_variant(text: str) -> tuple[str, int, float]:
    """``own@2e-3`` -> ("own", 1, 2e-3); ``weighted3@2e-3`` -> ("weighted", 3, 2e-3)."""
    kind, _, lr = text.partition("@")
    if kind == "own":
        return "own", 1, float(lr)
    if kind.startswith("weighted") and kind[8:].isdigit():
        return "weighted", int(kind[8:]), float(lr)
    raise SystemExit(f"variant {text!r}: use own@LR or weightedK@LR (K: how many times the own windows count)")


def run_variant(task: RecommendTask, shared: torch.nn.Module, data: dict[str, Any], seg: dict[str, list],
                variant: str, epochs: int, seed: int) -> dict[str, Any]:
    """Segment adapters of one variant on a copy of ``shared``; routed validation and test ranks."""
    kind, weight, lr = parse_variant(variant)
    model = copy.deepcopy(shared)
    segments = sorted(set(seg["test"]))
    for s in segments:
        dt.attach(model, dt.LoraConfig(target=[*ATTENTION, *FFN], rank=4, alpha=8.0), s)
    trained = {}
    for s in segments:
        own = [w for w, g in zip(data["train"], seg["train"]) if g == s]
        windows = own if kind == "own" else data["train"] + own * (weight - 1)
        val = [it for it, g in zip(data["validation"], seg["validation"]) if g == s]
        trained[s] = train_segment(task, model, s, windows, val, lr, epochs, seed)
    out = {"variant": variant, "segments": trained,
           "val_ranks": ranks_of(task, model, data["validation"], seg["validation"]).tolist(),
           "test_ranks": ranks_of(task, model, data["test"], seg["test"])}
    routed = logits_of(model, data["test"], seg["test"])
    out["routing_rank_mismatches"] = {}
    for s in segments:  # the mixed batch equals each segment's adapter run on its own rows
        rows = [i for i, g in enumerate(seg["test"]) if g == s]
        with dt.using(model, s):
            alone = logits_of(model, [data["test"][i] for i in rows], None)
            alone_ranks = ranks_of(task, model, [data["test"][i] for i in rows], None)
        # float32 sums in another order (a batch of other size and mix) move logits by ~1e-6; on a near-tie
        # that can move a rank by one, so the check is on the logits, and rank flips are counted
        assert torch.allclose(alone, routed[rows], rtol=1e-4, atol=1e-5), \
            f"routing differs from running segment {s} alone: max |difference| {(alone - routed[rows]).abs().max():.2e}"
        out["routing_rank_mismatches"][s] = int((alone_ranks != out["test_ranks"][rows]).sum())
    out["test_ranks"] = out["test_ranks"].tolist()
    return out


def segment_lists(data: dict[str, Any], segmentation: Callable[[dict[str, Any]], dict[str, str]]) -> dict[str, list]:
    users = segmentation(data)
    return {"train": [users[u] for u in data["train_users"]],
            "validation": [users[it["user"]] for it in data["validation"]],
            "test": [users[it["user"]] for it in data["test"]]}


def load_data(task: RecommendTask, positions: int = 1, test_positions: int = 1) -> dict[str, Any]:
    """Training windows (and whose), validation and test items; ``test_last[i]``: test item ``i`` is its
    user's last interaction (the leave-last-out item; with ``test_positions=1`` every test item is)."""
    config = validate_config({"task": "recommend", "method": "lora"})
    p = periods(config)
    ex = held_out(p, config.max_length, positions, test_positions)
    # the shared adapter's run holds out positions + k - 1 validation items: the same training windows
    assert ex["train"] == held_out(p, config.max_length, positions + test_positions - 1)["train"]
    test = ex["test"]
    return {"train": ex["train"], "train_users": ex["train_users"],
            "validation": task.encode(None, ex["validation"], config.max_length),
            "test": task.encode(None, test, config.max_length),
            "test_last": [i + 1 == len(test) or test[i + 1][0] != u for i, (u, _, _) in enumerate(test)]}


def write(record: dict[str, Any], out: Path) -> None:
    record["summary"] = summarise(record)
    record["load_average"] = os.getloadavg()
    write_json(out, record, indent=None)


def merge(record: dict[str, Any], other: dict[str, Any], name: str) -> dict[str, Any]:
    """``record`` with ``other``'s runs added: refused unless both hold the same split (positions, users)
    and, per seed they share, shared adapters with the same ranks (the runs compare on the same users)."""
    keys = ("positions", "test_positions", "val_users", "test_users", "test_last")
    differ = [k for k in keys if record.get(k) != other.get(k)]
    seeds = set(record["shared"]) & set(other["shared"])
    differ += [f"seed {s}'s shared ranks" for s in sorted(seeds) if record["shared"][s] != other["shared"][s]]
    if differ:
        raise SystemExit(f"{name} does not compare with the output it would join: {', '.join(differ)} differ")
    have = {(r["seed"], r["segmentation"], r["variant"]) for r in record["runs"]}
    new = [r for r in other["runs"] if (r["seed"], r["segmentation"], r["variant"]) not in have]
    return {**record, "shared": {**other["shared"], **record["shared"]}, "runs": record["runs"] + new}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--segmentations", default="age3,age2,gender", help=f"of {', '.join(SEGMENTATIONS)}")
    parser.add_argument("--variants", default="own@2e-3,own@5e-3,weighted3@2e-3")
    parser.add_argument("--epochs", type=int, default=4, help="at most; early stopping on validation picks")
    parser.add_argument("--positions", type=int, default=1,
                        help="validation interactions per user (data.validation_positions): early stopping and "
                             "the variant's choice read them; neither adapter trains on them")
    parser.add_argument("--test-positions", type=int, default=1,
                        help="test interactions per user, each ranked from its own prefix (1: leave-last-out "
                             "only; k > 1 adds the rolling evaluation over the last k, the leave-last-out item "
                             "still reported on its own); held out of training and validation")
    parser.add_argument("--out", default="bench/results/recommend_segments.json")
    parser.add_argument("--summarise", action="store_true", help="only recompute the summary of --out")
    parser.add_argument("--merge", default=None, metavar="JSON",
                        help="add the runs of another output of this bench (same split, same shared adapters: "
                             "e.g. another variant run in parallel) to --out, then summarise")
    args = parser.parse_args(argv)
    out = Path(args.out)
    record: dict[str, Any] = json.loads(out.read_text()) if out.is_file() else {}
    if args.merge:
        record = merge(record, json.loads(Path(args.merge).read_text()), args.merge)
    if args.summarise or args.merge:
        write(record, out)
        print(json.dumps(record["summary"]["chosen"], indent=1))
        return
    record = record if "runs" in record else {"runs": [], "shared": {}, "positions": args.positions,
                                              "test_positions": args.test_positions}
    held = (record.get("positions", 1), record.get("test_positions", 1))
    if held != (args.positions, args.test_positions):
        raise SystemExit(f"{out} holds runs with {held[0]} validation and {held[1]} test positions; pass another --out")
    torch.set_num_threads(1)
    task, t0 = RecommendTask(), time.perf_counter()
    data = load_data(task, args.positions, args.test_positions)
    for v in args.variants.split(","):
        parse_variant(v)
    record["val_users"] = [it["user"] for it in data["validation"]]  # paired standard errors over users
    record["test_users"] = [it["user"] for it in data["test"]]
    record["test_last"] = data["test_last"]
    with tempfile.TemporaryDirectory() as tmp:
        for seed in (int(x) for x in args.seeds.split(",")):
            shared, metrics = shared_model(seed, tmp, args.positions + args.test_positions - 1, sum(data["test_last"]))
            mine = {"val_ranks": ranks_of(task, shared, data["validation"], None).tolist(),
                    "test_ranks": ranks_of(task, shared, data["test"], None).tolist(),
                    "test_ndcg_10": metrics["test_ndcg_10"], "base_test_ndcg_10": metrics["test_base_ndcg_10"]}
            last = scores(torch.tensor([r for r, f in zip(mine["test_ranks"], data["test_last"]) if f]))["ndcg_10"]
            assert abs(last - metrics["test_ndcg_10"]) < 1e-9, "the leave-last-out items differ from the task's test"
            before = record["shared"].get(str(seed))
            if before and (before["val_ranks"], before["test_ranks"]) != (mine["val_ranks"], mine["test_ranks"]):
                raise SystemExit(f"seed {seed}'s shared adapter trained again ranks differently from the one in {out}; "
                                 "its runs would not compare: pass another --out")
            record["shared"][str(seed)] = mine
            for name in args.segmentations.split(","):
                seg = segment_lists(data, SEGMENTATIONS[name])
                for variant in args.variants.split(","):
                    result = run_variant(task, shared, data, seg, variant, args.epochs, seed)
                    record["runs"].append({"seed": seed, "segmentation": name, **result,
                                           "test_segments": seg["test"], "val_segments": seg["validation"]})
                    write(record, out)
                    print(f"seed {seed} {name} {variant}: best epochs "
                          f"{ {s: r['best_epoch'] for s, r in result['segments'].items()} } "
                          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    print(json.dumps(record["summary"]["chosen"], indent=1))


if __name__ == "__main__":
    main()
