"""The summary of ``bench.recommend_segments``: per segmentation and variant, per segment, shared vs segment
NDCG@10 over seeds, their paired difference, and the variant chosen on the validation users.

Each variant is also reported under the keep rule (``deltatune.train.segments.keep_segments``): per seed,
a segment keeps its adapter only when its validation gain over the shared adapter, paired over the
segment's validation users, is more than ``z`` standard errors (``GATES``; 1 is the rule, fixed before any
test figure of the 5-position run was read); the other segments are served by the shared adapter
(routed to ``None``: the merged shared model itself, so their ranks are the shared run's, exactly)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from typing import Any

from bench.recommend_common import pm
from deltatune.train.segments import keep_segments

GATES = (1.0, 2.0)  # standard errors of the keep rule; 1.0: the one-standard-error rule
#: The goal's test, fixed before the rolling run: a segment's adapter beats the shared adapter on its own
#: segment when the paired test difference over its users (seed-averaged per user) exceeds BEATS standard
#: errors (one-sided, about 2.3 % by chance under normality), read on the rolling evaluation when there is one.
BEATS = 2.0


def ndcg(ranks: list[int]) -> list[float]:
    """Per-user NDCG@10 of 0-based ranks (one relevant item: 1 / log2(rank + 2) inside the top 10)."""
    return [1.0 / math.log2(r + 2.0) if r < 10 else 0.0 for r in ranks]


def mean_se(values: list[float]) -> dict[str, float]:
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return {"mean": statistics.fmean(values), "se": se}


def _pick(values: list[float], segments: list[str], s: str | None, users: list[Any],
          mask: list[bool] | None) -> list[float]:
    """Per user of segment ``s`` (None: every user), the mean of their examples' ``values`` (where ``mask``):
    a user's several examples are not independent, so each user counts once."""
    per: dict[Any, list[float]] = {}
    for i, (v, g, u) in enumerate(zip(values, segments, users)):
        if (s is None or g == s) and (mask is None or mask[i]):
            per.setdefault(u, []).append(v)
    return [statistics.fmean(v) for v in per.values()]


def compare(runs: list[dict[str, Any]], shared: dict[str, Any], split: str, s: str | None,
            users: list[Any] | None = None, mask: list[bool] | None = None) -> dict[str, Any]:
    """Shared vs segment NDCG@10 on segment ``s`` (None: every user) of ``split`` (val / test), over seeds:
    means ± standard errors, the paired difference over seeds and over users (seed-averaged per user).
    ``users[i]``: whose example ``i`` is (default: one example per user); ``mask``: which examples count."""
    key, seg_key = f"{split}_ranks", f"{split}_segments"
    users = users if users is not None else list(range(len(runs[0][key])))
    a = [_pick(ndcg(shared[str(r["seed"])][key]), r[seg_key], s, users, mask) for r in runs]  # per seed, per user
    b = [_pick(ndcg(r[key]), r[seg_key], s, users, mask) for r in runs]
    per_seed = [statistics.fmean(y) - statistics.fmean(x) for x, y in zip(a, b)]
    per_user = [statistics.fmean(col) for col in zip(*[[y - x for x, y in zip(xs, ys)] for xs, ys in zip(a, b)])]
    return {"users": len(a[0]), "shared": mean_se([statistics.fmean(x) for x in a]),
            "segment": mean_se([statistics.fmean(y) for y in b]), "difference": mean_se(per_seed),
            "difference_over_users": mean_se(per_user), "difference_per_seed": per_seed}


def gated(run: dict[str, Any], shared: dict[str, Any], users: list[Any], z: float) -> dict[str, Any]:
    """``run`` with each segment's adapter kept only where its validation shows a gain of more than ``z``
    standard errors (paired over users); the other segments' rows take the shared adapter's ranks."""
    base = shared[str(run["seed"])]
    decisions = keep_segments(ndcg(base["val_ranks"]), ndcg(run["val_ranks"]), run["val_segments"], users, z)
    keep = {s: decisions.get(s, {"keep": False})["keep"] for s in run["segments"]}

    def pick(split: str) -> list[int]:
        return [mine if keep[s] else theirs
                for mine, theirs, s in zip(run[f"{split}_ranks"], base[f"{split}_ranks"], run[f"{split}_segments"])]

    return {**run, "variant": f"{run['variant']} kept at {z:g} se", "kept": keep, "decisions": decisions,
            "val_ranks": pick("val"), "test_ranks": pick("test")}


def per_segment(runs: list[dict[str, Any]], choice: dict[str, str]) -> list[dict[str, Any]]:
    """Per seed, the run whose segment ``s`` adapter is the one of variant ``choice[s]``: one routed batch
    serves each segment's rows with its own adapter, so those rows' ranks are that variant's run's, exactly."""
    out = []
    for seed in dict.fromkeys(r["seed"] for r in runs):
        of = {r["variant"]: r for r in runs if r["seed"] == seed}
        if not set(choice.values()) <= set(of):
            continue  # a seed without every chosen variant
        first = of[choice[min(choice)]]

        def pick(split: str) -> list[int]:
            return [of[choice[g]][f"{split}_ranks"][i] for i, g in enumerate(first[f"{split}_segments"])]

        out.append({**first, "variant": PER_SEGMENT, "choice": choice, "val_ranks": pick("val"),
                    "test_ranks": pick("test"), "segments": {s: of[v]["segments"][s] for s, v in choice.items()}})
    return out


#: The variant name of each segment's own choice (:func:`per_segment`): per segment, the plain variant with the
#: best mean validation gain over its validation users. Fixed after seeds 0-2's test figures had been read, so
#: it is judged on other seeds (the README's confirmation run).
PER_SEGMENT = "each segment's own choice"


def summarise(record: dict[str, Any]) -> dict[str, Any]:
    """Per (segmentation, variant), plain and under the keep rule: per segment and overall, validation and
    test comparisons; per segmentation, the plain variant with the best mean validation gain over the
    shared adapter (all seeds), and with several plain variants, each segment's own choice among them on
    its validation users (:data:`PER_SEGMENT`)."""
    runs, shared = record.get("runs", []), record.get("shared", {})
    users = record.get("val_users")  # older records: one validation item per user
    runs = runs + [gated(r, shared, users or list(range(len(r["val_ranks"]))), z) for z in GATES for r in runs]
    plain = [r for r in runs if " kept at " not in r["variant"]]
    test_users, last = record.get("test_users"), record.get("test_last")
    rolling = record.get("test_positions", 1) > 1

    def views(mine: list[dict[str, Any]], s: str | None) -> dict[str, Any]:
        """validation (every held-out item), test (leave-last-out: each user's last item), and with
        several test positions test_rolling (every test item, each user's mean)."""
        out = {"validation": compare(mine, shared, "val", s, users), "test": compare(mine, shared, "test", s, test_users, last)}
        if rolling:
            out["test_rolling"] = compare(mine, shared, "test", s, test_users)
        return out

    out: dict[str, Any] = {"variants": {}, "chosen": {}, "chosen_per_segment": {}}
    for key in dict.fromkeys((r["segmentation"], r["variant"]) for r in runs):
        mine = [r for r in runs if (r["segmentation"], r["variant"]) == key]
        out["variants"][f"{key[0]} {key[1]}"] = row_of(mine, views)
    for name in dict.fromkeys(r["segmentation"] for r in runs):
        rows = [v for v in out["variants"].values() if v["segmentation"] == name and " kept at " not in v["variant"]]
        most = max(len(v["seeds"]) for v in rows)
        rows = [v for v in rows if len(v["seeds"]) == most]
        best = max(rows, key=lambda v: v["validation"]["difference"]["mean"])
        out["chosen"][name] = {"variant": best["variant"], "seeds": best["seeds"], "table": markdown(best)}
        if len(rows) > 1:
            choice = {s: max(rows, key=lambda v: v["segments"][s]["validation"]["difference"]["mean"])["variant"]
                      for s in rows[0]["segments"]}
            mixed = row_of(per_segment([r for r in plain if r["segmentation"] == name], choice), views)
            out["variants"][f"{name} {PER_SEGMENT}"] = mixed
            out["chosen_per_segment"][name] = {"choice": choice, "seeds": mixed["seeds"], "goal": mixed["goal"],
                                               "table": mixed["table"]}
    out["overview"] = overview(out)
    return out


def row_of(mine: list[dict[str, Any]], views: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    """One (segmentation, variant)'s summary over its runs (one a seed)."""
    key = (mine[0]["segmentation"], mine[0]["variant"])
    segments = sorted(set(mine[0]["test_segments"]))
    row = {"segmentation": key[0], "variant": key[1], "seeds": [r["seed"] for r in mine], **views(mine, None),
           "best_epochs": {s: [r["segments"][s]["best_epoch"] if r.get("kept", {}).get(s, True) else "shared"
                               for r in mine] for s in segments},
           "windows": {s: mine[0]["segments"][s]["windows"] for s in segments},
           "segments": {s: views(mine, s) for s in segments}}
    row["segments_beating_shared_on_test"] = sum(v["test"]["difference"]["mean"] > 0
                                                 for v in row["segments"].values())
    row["segments_behind_shared_on_test"] = sum(v["test"]["difference"]["mean"] < 0
                                                for v in row["segments"].values())
    row["goal"] = goal(row)
    if "decisions" in mine[0]:  # the keep rule's validation evidence, per seed
        row["decisions"] = {s: [r["decisions"].get(s) for r in mine] for s in segments}
    row["table"] = markdown(row)
    return row


def goal(row: dict[str, Any]) -> dict[str, Any]:
    """Per segment, the paired test difference over users in standard errors (``z``; rolling when there
    is a rolling evaluation, else leave-last-out), and whether every segment's exceeds ``BEATS``."""
    view = "test_rolling" if "test_rolling" in row else "test"
    z = {}
    for s, v in row["segments"].items():
        d = v[view]["difference_over_users"]
        z[s] = d["mean"] / d["se"] if d["se"] > 0 else 0.0
    return {"view": view, "beats": BEATS, "z": z, "segments_beating": sum(x > BEATS for x in z.values()),
            "met": all(x > BEATS for x in z.values())}


def overview(out: dict[str, Any]) -> str:
    """One line per (segmentation, variant): every user, validation and test, and segments ahead on test."""
    d = lambda v: pm(v, True)  # noqa: E731
    rolling = any("test_rolling" in v for v in out["variants"].values())
    lines = ["| segmentation | variant | seeds | validation difference | test difference (over seeds) | "
             "test difference (over users) | segments ahead / behind on test |"
             + (" rolling test difference (over seeds) | rolling (over users) | segments > 2 se ahead (rolling) |"
                if rolling else ""), "|:--|:--|--:|--:|--:|--:|--:|" + ("--:|--:|--:|" if rolling else "")]
    for v in out["variants"].values():
        chosen = out["chosen"].get(v["segmentation"], {}).get("variant") == v["variant"]
        line = (f"| {v['segmentation']} | {v['variant']}{' (chosen)' if chosen else ''} | {len(v['seeds'])} | "
                f"{d(v['validation']['difference'])} | {d(v['test']['difference'])} | "
                f"{d(v['test']['difference_over_users'])} | {v['segments_beating_shared_on_test']} / "
                f"{v['segments_behind_shared_on_test']} of {len(v['segments'])} |")
        if rolling:
            r = v["test_rolling"]
            line += (f" {d(r['difference'])} | {d(r['difference_over_users'])} | "
                     f"{v['goal']['segments_beating']} of {len(v['segments'])} |")
        lines.append(line)
    return "\n".join(lines)


def markdown(row: dict[str, Any]) -> str:
    """The README's table for one (segmentation, variant)."""
    f = pm
    d = lambda v: pm(v, True)  # noqa: E731
    rolling = "test_rolling" in row
    lines = ["| segment | test users | windows | stopped at epoch | shared NDCG@10 | segment NDCG@10 | "
             "difference (over seeds) | difference (over users) | validation difference |"
             + (" rolling: shared | segment | difference (over seeds) | difference (over users) | z |" if rolling else ""),
             "|:--|--:|--:|:--|--:|--:|--:|--:|--:|" + ("--:|--:|--:|--:|--:|" if rolling else "")]

    def cells(t: dict[str, Any]) -> str:
        return f"{f(t['shared'])} | {f(t['segment'])} | {d(t['difference'])} | {d(t['difference_over_users'])}"

    for s, v in row["segments"].items():
        t = v["test"]
        line = (f"| {s} | {t['users']} | {row['windows'][s]} | {', '.join(map(str, row['best_epochs'][s]))} | "
                f"{cells(t)} | {d(v['validation']['difference'])} |")
        if rolling:
            line += f" {cells(v['test_rolling'])} | {row['goal']['z'][s]:+.1f} |"
        lines.append(line)
    t = row["test"]
    line = f"| all (one routed batch) | {t['users']} | — | — | {cells(t)} | {d(row['validation']['difference'])} |"
    if rolling:
        line += f" {cells(row['test_rolling'])} | — |"
    lines.append(line)
    return "\n".join(lines)
