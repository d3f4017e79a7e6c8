"""Smoke test of ``python -m bench.serve --quick``: every row runs and the JSON has its ratios."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("peft")


def test_quick_serve_bench_writes_rows_ratios_and_goals(tmp_path):
    from bench import serve

    out = tmp_path / "serve.json"
    serve.main(["--quick", "--threads", "1", "--clients", "3", "--warmup", "0.5", "--seconds", "1", "--rounds", "1",
                "--pairs", "2", "--adapters", "1,3", "--max-loaded", "2", "--out", str(out)])
    data = json.loads(out.read_text())
    assert set(data["rows"]) == {"deltatune M=base", "deltatune M=1", "deltatune M=3", "peft-switch M=1",
                                 "peft-switch M=3", "peft-batched M=1", "peft-batched M=3"}
    assert all(row["failed"] == 0 and row["tokens_per_s"] > 0 for row in data["rows"].values())
    assert {"1 adapter / base", "3 adapters / 1 adapter", "deltatune / peft-batched, M=3"} <= set(data["ratios"])
    assert data["goals"]["1 adapter / base"]["target"] == 0.9

    # The bare base and 1 adapter: two pairs of adjacent windows, order alternating, ratio per pair.
    pairs = data["pairs"]
    assert [p["order"] for p in pairs] == [["base", "1 adapter"], ["1 adapter", "base"]]
    assert len(data["rounds"]["deltatune M=base"]) == len(data["rounds"]["deltatune M=1"]) == 2
    for p in pairs:
        assert p["ratio"] == pytest.approx(p["one_tokens_per_s"] / p["base_tokens_per_s"])
    median = sorted(p["ratio"] for p in pairs)
    assert data["goals"]["1 adapter / base"]["measured"] == pytest.approx((median[0] + median[1]) / 2)
    assert "1 adapter / base, ratio of row medians" in data["ratios"]


def test_pair_windows_share_one_plan():
    """A pair's two windows send the same prompts and lengths; only the adapter differs."""
    from bench.serve_load import make_plan

    base, one = make_plan([None], 50, 16, 16, 1000, seed=1), make_plan(["a000"], 50, 16, 16, 1000, seed=1)
    assert [(p, n) for _, p, n in base] == [(p, n) for _, p, n in one]
    assert {a for a, _, _ in one} == {"a000"}


def test_quick_serve_step_times_every_setup(tmp_path):
    from bench import serve_step

    out = tmp_path / "step.json"
    data = serve_step.main(["--quick", "--adapters", "3", "--rows", "4", "--rounds", "2", "--steps", "1",
                            "--profile", "1", "--out", str(out)])
    assert json.loads(out.read_text())["decode"]["medians"].keys() == {"base", "1 adapter", "3 adapters"}
    for phase in ("decode", "prefill", "layer"):
        assert all(v["wall_s"] > 0 and v["cpu_s"] >= 0 for v in data[phase]["medians"].values())
        assert set(data[phase]["ratios"]) == {f"{s} / base, {f}" for s in ("1 adapter", "3 adapters")
                                              for f in ("wall_s", "cpu_s")}
    assert set(data["profiles"]) == {"base", "1 adapter"}


def test_quick_serve_pairs_alternates_and_takes_each_pairs_ratio(tmp_path):
    from bench import serve_pairs

    data = serve_pairs.main(["--quick", "--pairs", "2", "--adapters", "3", "--clients", "3", "--warmup", "0.5",
                             "--seconds", "1", "--threads", "1", "--out", str(tmp_path / "pairs.json")])
    assert [p["order"] for p in data["pairs"]] == [[1, 3], [3, 1]]
    for p in data["pairs"]:
        assert p["ratio"] == pytest.approx(p["many"] / p["one"])
    assert json.loads((tmp_path / "pairs.json").read_text())["median_ratio"] == pytest.approx(data["median_ratio"])
