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

    # deltatune's rows: two chains of adjacent windows, order reversed, each ratio taken within a chain.
    chains = data["chains"]
    assert [c["order"] for c in chains] == [["base", "1 adapter", "3 adapters"], ["3 adapters", "1 adapter", "base"]]
    assert len(data["rounds"]["deltatune M=base"]) == len(data["rounds"]["deltatune M=3"]) == 2
    for c in chains:
        tps = c["tokens_per_s"]
        assert c["ratios"]["1 adapter / base"] == pytest.approx(tps["1 adapter"] / tps["base"])
        assert c["ratios"]["3 adapters / 1 adapter"] == pytest.approx(tps["3 adapters"] / tps["1 adapter"])
    for key in ("1 adapter / base", "3 adapters / 1 adapter"):
        within = sorted(c["ratios"][key] for c in chains)
        assert data["ratios"][key] == pytest.approx((within[0] + within[1]) / 2)
        assert f"{key}, ratio of row medians" in data["ratios"]
    assert data["goals"]["1 adapter / base"]["measured"] == pytest.approx(data["ratios"]["1 adapter / base"])


def test_chain_windows_share_one_plan():
    """Every window of a chain sends the same prompts and lengths; only the adapters named differ."""
    from bench.serve_load import make_plan

    names = [f"a{i:03d}" for i in range(32)]
    base, one, many = (make_plan(n, 50, 16, 16, 1000, seed=1) for n in ([None], ["a000"], names))
    assert [(p, n) for _, p, n in base] == [(p, n) for _, p, n in one] == [(p, n) for _, p, n in many]
    assert {a for a, _, _ in one} == {"a000"}
    assert len({a for a, _, _ in many}) > 16  # drawn over the 32


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


def test_quick_http_bench_drives_a_real_server_and_peft(tmp_path):
    """``bench.serve_http``: a ``deltatune serve`` subprocess under streamed HTTP clients (every
    token counted from its own event), PEFT beside it; chains, ratios and the server's metrics."""
    from bench import serve_http

    out = tmp_path / "http.json"
    data = serve_http.main(["--quick", "--device", "cpu", "--threads", "1", "--clients", "3", "--warmup", "0.3",
                            "--seconds", "1", "--pairs", "1", "--adapters", "1,3", "--max-loaded", "2",
                            "--setups", "deltatune,peft-batched", "--out", str(out)])
    assert json.loads(out.read_text())["rows"].keys() == {"deltatune M=base", "deltatune M=1", "deltatune M=3",
                                                          "peft-batched M=1", "peft-batched M=3"}
    assert all(row["failed"] == 0 and row["tokens_per_s"] > 0 for row in data["rows"].values())
    assert [c["order"] for c in data["chains"]] == [["base", "1 adapter", "3 adapters"]]
    assert data["warm_errors"] == [] and data["mean_rows_per_pass"] >= 1
    assert data["server_metrics"]["deltatune_adapter_cache_evictions_total"] > 0  # 3 adapters through 2 slots
    assert (tmp_path / "http.server.log").is_file()


def test_quick_serve_work_times_the_loop_on_a_fixed_plan(tmp_path):
    """``bench.serve_work``: the same requests for both setups (same steps' worth of work), each
    pair's ratios from its own two runs."""
    from bench import serve_work

    data = serve_work.main(["--quick", "--requests", "6", "--clients", "3", "--pairs", "2", "--threads", "1",
                            "--out", str(tmp_path / "work.json")])
    runs = data["runs"]
    assert [r["setup"] for r in runs] == ["base", "1 adapter", "1 adapter", "base"]
    assert all(r["decode_steps"] > 0 and r["prefills"] > 0 and r["decode_cpu_s"] > 0 for r in runs)
    first = data["ratios"]["1 adapter / base, wall_s"]["pairs"][0]
    assert first == pytest.approx(runs[1]["wall_s"] / runs[0]["wall_s"], rel=1e-3)
