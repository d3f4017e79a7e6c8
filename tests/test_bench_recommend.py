"""The recommender benches' shared helpers (``bench.recommend_common``) and the segment report's keep rule:
a segment whose validation gain is inside the threshold is served by the shared adapter's ranks, on
validation and test alike, and the report counts segments ahead and behind."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from bench.measure import write_json
from bench.recommend_common import pm, progress
from bench.recommend_segments_report import gated, summarise


def test_cells_json_and_progress_line(tmp_path: Path, capsys) -> None:
    assert pm({"mean": 0.12345, "se": 0.00012}) == "0.1235 ± 0.0001"
    assert pm((-0.0012, 0.0004), signed=True) == "-0.0012 ± 0.0004"
    assert pm([0.01, 0.002], signed=True) == "+0.0100 ± 0.0020"
    out = tmp_path / "deep" / "r.json"
    write_json(out, {"a": [1]})
    assert json.loads(out.read_text()) == {"a": [1]} and out.read_text() == '{\n "a": [\n  1\n ]\n}\n'
    write_json(out, {"a": [1]}, indent=None)
    assert out.read_text() == '{"a": [1]}\n' and [p.name for p in out.parent.iterdir()] == ["r.json"]
    progress("lora seed 0", {"validation": [{"ndcg_10": 0.123456}], "seconds": 1.5}, "0.1000", t0=0.0)
    line = capsys.readouterr().out
    assert line.startswith("lora seed 0: val [0.1235] test 0.1000 (1.5 s, ") and line.endswith(" s in all)\n")


def _record() -> dict:
    """One seed, two segments: 'a' gains on all four validation users (kept), 'b' gains on one of four
    and loses on another (dropped at one standard error). Ranks are 0-based (rank 0: NDCG 1)."""
    val_segments = ["a"] * 4 + ["b"] * 4
    shared = {"0": {"val_ranks": [5] * 8, "test_ranks": [3, 3, 3, 3]}}
    run = {"seed": 0, "segmentation": "s", "variant": "own@1e-3",
           "segments": {"a": {"best_epoch": 2, "windows": 10}, "b": {"best_epoch": 1, "windows": 10}},
           "val_ranks": [0, 0, 1, 0, 0, 5, 5, 9], "val_segments": val_segments,
           "test_ranks": [0, 50, 1, 50], "test_segments": ["a", "b", "a", "b"]}
    return {"runs": [run], "shared": shared, "val_users": [f"u{i}" for i in range(8)]}


def test_keep_rule_serves_dropped_segments_with_the_shared_ranks() -> None:
    record = _record()
    g = gated(record["runs"][0], record["shared"], record["val_users"], z=1.0)
    assert g["kept"] == {"a": True, "b": False} and g["variant"] == "own@1e-3 kept at 1 se"
    assert g["test_ranks"] == [0, 3, 1, 3] and g["val_ranks"] == [0, 0, 1, 0, 5, 5, 5, 5]
    summary = summarise(record)
    plain, rule = summary["variants"]["s own@1e-3"], summary["variants"]["s own@1e-3 kept at 1 se"]
    assert (plain["segments_beating_shared_on_test"], plain["segments_behind_shared_on_test"]) == (1, 1)
    assert (rule["segments_beating_shared_on_test"], rule["segments_behind_shared_on_test"]) == (1, 0)
    assert rule["best_epochs"] == {"a": [2], "b": ["shared"]}
    assert rule["segments"]["b"]["test"]["difference"]["mean"] == 0.0
    assert summary["chosen"]["s"]["variant"] == "own@1e-3"  # the choice is among the plain variants


def test_rolling_view_averages_each_users_items_and_leave_last_out_reads_the_last() -> None:
    """Two test items per user (rolling, k = 2): ``test`` reads only each user's last item, ``test_rolling``
    each user's mean over both, so a user counts once; the goal's z is the rolling paired difference over
    users in standard errors."""
    from bench.recommend_segments_report import ndcg

    users = ["u0", "u0", "u1", "u1", "u2", "u2"]
    shared = {"0": {"val_ranks": [5, 5, 5], "test_ranks": [9, 9, 9, 9, 9, 9]}}
    run = {"seed": 0, "segmentation": "s", "variant": "own@1e-3", "segments": {"a": {"best_epoch": 1, "windows": 3}},
           "val_ranks": [0, 0, 0], "val_segments": ["a"] * 3,
           "test_ranks": [0, 9, 9, 0, 0, 0], "test_segments": ["a"] * 6}
    record = {"runs": [run], "shared": shared, "val_users": ["u0", "u1", "u2"], "test_users": users,
              "test_last": [False, True] * 3, "test_positions": 2}
    row = summarise(record)["variants"]["s own@1e-3"]
    n0, n9 = ndcg([0])[0], ndcg([9])[0]
    last = [n9 - n9, n0 - n9, n0 - n9]  # u0's last item is unchanged; u1 and u2 gain
    rolling = [(n0 - n9) / 2, (n0 - n9) / 2, n0 - n9]
    assert row["test"]["users"] == row["test_rolling"]["users"] == 3
    assert math.isclose(row["test"]["difference_over_users"]["mean"], statistics.fmean(last))
    assert math.isclose(row["test_rolling"]["difference_over_users"]["mean"], statistics.fmean(rolling))
    se = statistics.stdev(rolling) / math.sqrt(3)
    assert math.isclose(row["test_rolling"]["difference_over_users"]["se"], se)
    assert math.isclose(row["goal"]["z"]["a"], statistics.fmean(rolling) / se)
    assert row["goal"]["met"] == (statistics.fmean(rolling) / se > 2.0) and row["goal"]["view"] == "test_rolling"
    assert "rolling" in row["table"] and "rolling" in summarise(record)["overview"]


def test_merge_adds_another_variants_runs_only_on_the_same_split_and_shared_adapters() -> None:
    import copy

    import pytest

    from bench.recommend_segments import merge

    a = _record()
    b = copy.deepcopy(a)
    b["runs"][0]["variant"] = "weighted3@2e-3"
    merged = merge(a, b, "b.json")
    assert [r["variant"] for r in merged["runs"]] == ["own@1e-3", "weighted3@2e-3"]
    assert merge(merged, b, "b.json")["runs"] == merged["runs"]  # a run already there is not added twice
    assert set(summarise(merged)["variants"]) >= {"s own@1e-3", "s weighted3@2e-3"}
    b["shared"]["0"]["test_ranks"] = [4, 3, 3, 3]
    with pytest.raises(SystemExit, match="seed 0's shared ranks differ"):
        merge(a, b, "b.json")
    b = copy.deepcopy(a) | {"test_positions": 10}
    with pytest.raises(SystemExit, match="test_positions differ"):
        merge(a, b, "b.json")


def test_each_segment_takes_the_variant_its_own_validation_users_prefer() -> None:
    """Two variants: 'a' validates better under own@1e-3, 'b' under w@1e-3 (though w's routed total is higher).
    Each segment's own choice serves each segment's rows with its chosen variant's ranks, on validation and
    test alike; the per-segmentation choice stays the single variant with the better total."""
    from bench.recommend_segments_report import PER_SEGMENT

    record = _record()
    other = {**record["runs"][0], "variant": "w@1e-3", "val_ranks": [1, 1, 2, 1, 0, 0, 0, 0],
             "test_ranks": [7, 0, 8, 2], "segments": {"a": {"best_epoch": 3, "windows": 30},
                                                      "b": {"best_epoch": 4, "windows": 30}}}
    record["runs"].append(other)
    summary = summarise(record)
    assert summary["chosen"]["s"]["variant"] == "w@1e-3"
    mine = summary["chosen_per_segment"]["s"]
    assert mine["choice"] == {"a": "own@1e-3", "b": "w@1e-3"}
    row = summary["variants"][f"s {PER_SEGMENT}"]
    n = lambda r: 1.0 / math.log2(r + 2.0) if r < 10 else 0.0  # noqa: E731
    assert math.isclose(row["test"]["segment"]["mean"], statistics.fmean([n(0), n(0), n(1), n(2)]))  # a: 0, 1; b: 0, 2
    assert row["best_epochs"] == {"a": [2], "b": [4]} and row["windows"] == {"a": 10, "b": 30}
    assert math.isclose(row["segments"]["b"]["validation"]["segment"]["mean"], 1.0)  # w's b ranks: all 0
    assert mine["goal"] == row["goal"]
