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
    assert set(saved["setups"]) == {"floor fp32", "floor bf16", "floor bf16+frozen16", "deltatune-lora fp32",
                                    "deltatune-lora bf16", "deltatune-lora bf16+frozen16", "peft-lora fp32",
                                    "peft-lora bf16", "peft-lora bf16+frozen16"}
    for r in saved["setups"].values():
        assert r["flops"] > 0 and r["step_s"] > 0 and r["gflops_achieved"] > 0
    # a LoRA step does at least the floor's products
    assert saved["setups"]["deltatune-lora fp32"]["flops"] >= saved["setups"]["floor fp32"]["flops"]
    for lib, best in res["best"].items():
        mine = [r["step_s"] for r in saved["setups"].values() if r["setup"] == lib]
        assert best["step_s"] == min(mine)
    assert saved["matmul_peak_gflops"]["bfloat16"] > 0
    assert "best against best" in capsys.readouterr().out
