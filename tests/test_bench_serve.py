"""Smoke test of ``python -m bench.serve --quick``: every row runs and the JSON has its ratios."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("peft")


def test_quick_serve_bench_writes_rows_ratios_and_goals(tmp_path):
    from bench import serve

    out = tmp_path / "serve.json"
    serve.main(["--quick", "--threads", "1", "--clients", "3", "--warmup", "0.5", "--seconds", "1", "--rounds", "1",
                "--adapters", "1,3", "--max-loaded", "2", "--out", str(out)])
    data = json.loads(out.read_text())
    assert set(data["rows"]) == {"deltatune M=base", "deltatune M=1", "deltatune M=3", "peft-switch M=1",
                                 "peft-switch M=3", "peft-batched M=1", "peft-batched M=3"}
    assert all(row["failed"] == 0 and row["tokens_per_s"] > 0 for row in data["rows"].values())
    assert {"1 adapter / base", "3 adapters / 1 adapter", "deltatune / peft-batched, M=3"} <= set(data["ratios"])
    assert data["goals"]["1 adapter / base"]["target"] == 0.9
