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


def test_bf16_bench_sizes_write_one_file_with_every_run_and_the_floor_gap(tmp_path):
    from bench import bf16

    out = tmp_path / "sizes.json"
    bf16.main(["--workloads", "tiny-llama", "--sizes", "default", "2x8", "--rounds", "2", "--steps-per-round", "2",
               "--threads", "1", "--setups", "floor", "deltatune-lora", "--variants", "fp32", "bf16", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert [(r["batch"], r["length"]) for r in saved["runs"]] == [(2, 16), (2, 8)] and not saved["skipped"]
    for run in saved["runs"]:
        assert not run["partial"] and run["device"] == "cpu"
        assert set(run["lora_vs_floor"]) == {"fp32", "bf16"}
        gap = run["lora_vs_floor"]["bf16"]
        lora, floor = run["setups"]["deltatune-lora bf16"], run["setups"]["floor bf16"]
        assert gap["ratio"] == lora["step_s"] / floor["step_s"]
        assert lora["rounds_done"] == 2 and len(lora["step_all"]) == 2
        assert lora["peak_bytes"] > 0 and lora["flops"] > floor["flops"]
    assert saved["runs"][1]["setups"]["floor fp32"]["flops"] < saved["runs"][0]["setups"]["floor fp32"]["flops"]


def test_bf16_bench_budget_spent_skips_the_runs_not_started(tmp_path, capsys):
    from bench import bf16

    out = tmp_path / "budget.json"
    bf16.main(["--workloads", "tiny-bert", "--sizes", "default", "gpu", "--budget-s", "0", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["runs"] == [] and saved["skipped"] == ["tiny-bert 4x16", "tiny-bert 8x32"]
    assert "skipped (past --budget-s)" in capsys.readouterr().out


def test_bf16_bench_rejects_a_variant_the_device_does_not_run():
    from bench import bf16

    with pytest.raises(SystemExit, match="tf32 do not run on cpu"):
        bf16.main(["--workloads", "tiny-bert", "--variants", "tf32"])
