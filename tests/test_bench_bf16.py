"""Smoke test of ``python -m bench.bf16``: every variant runs, FLOPs are counted, best-against-best is picked."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("peft")
pytest.importorskip("transformers")


def test_bf16_bench_runs_and_reports_best_against_best(tmp_path, capsys):
    from bench import bf16

    out = tmp_path / "bf16.json"
    res = bf16.main(["--workloads", "tiny-bert", "--rounds", "1", "--threads", "1",
                     "--setups", "floor", "deltatune-lora", "peft-lora", "--out", str(out)])["tiny-bert"]
    saved = json.loads(out.read_text())
    assert set(saved["setups"]) == {f"{lib} {v}" for lib in ("floor", "deltatune-lora", "peft-lora")
                                    for v in ("fp32", "bf16", "bf16+frozen16", "bf16+fastdrop")}
    for r in saved["setups"].values():
        assert r["flops"] > 0 and r["step_s"] > 0 and r["gflops_achieved"] > 0
    # a LoRA step does at least the floor's products
    assert saved["setups"]["deltatune-lora fp32"]["flops"] >= saved["setups"]["floor fp32"]["flops"]
    for lib, best in res["best"].items():
        # PEFT's best is over what a PEFT run has: torch's dropout, not deltatune's fast one
        mine = [r["step_s"] for label, r in saved["setups"].items()
                if r["setup"] == lib and not (lib == "peft-lora" and r["fastdrop"])]
        assert best["step_s"] == min(mine)
    assert res["best"]["peft-lora"]["variant"] != "peft-lora bf16+fastdrop"
    assert saved["matmul_peak_gflops"]["bfloat16"] > 0
    assert "best against best" in capsys.readouterr().out
