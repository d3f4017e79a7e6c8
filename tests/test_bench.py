"""Smoke test of ``python -m bench.run --quick``: it runs end to end and writes complete JSON.

No timing or memory figure is asserted (machines are noisy); only that every part is measured,
and that the memory tracker counts what it should.
"""

from __future__ import annotations

import json

import torch

from bench import measure, run


def test_quick_run_writes_every_section(tmp_path, capsys):
    out = tmp_path / "bench.json"
    run.main(["--quick", "--rounds", "1", "--workloads", "tiny-bert", "--out", str(out)])
    results = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert "training step" in printed and "Goals" in printed
    train = results["tiny-bert"]["train"]
    for setup in ("full", "floor", "deltatune-lora", "peft-lora", "deltatune-lora-thin"):
        assert train[setup]["step_s"] > 0 and train[setup]["tensor_peak"] > 0
    assert train["deltatune-lora"]["trainable"] < train["full"]["trainable"]
    assert set(results["tiny-bert"]["inference"]) == {
        "base", "deltatune-unmerged", "deltatune-unmerged-thin", "deltatune-merged", "peft-unmerged", "peft-merged"}
    assert results["tiny-bert"]["inference"]["deltatune-merged"]["max_abs_diff_vs_unmerged"] < 1e-4
    assert results["tiny-bert"]["io"]["deltatune"]["weights_bytes"] > 0
    assert {g["goal"] for g in results["goals"]} >= {"LoRA step / full fine-tuning step"}
    assert results["machine"]["loadavg_start"] and results["machine"]["memory_method"]


def test_tensor_peak_counts_live_tensors_and_frees():
    def step():
        a = torch.empty(1000)            # 4,000 bytes
        b = torch.empty(500)             # + 2,000 bytes: the peak
        del a, b
        keep.append(torch.empty(250))    # 1,000 bytes that outlive the step

    keep: list[torch.Tensor] = []
    result = measure.tensor_peak(step, steps=1)
    assert result == {"peak": 6000, "after": 1000}


def test_tensor_peak_ignores_views_of_existing_tensors():
    """Weights existed before the step: their views (``W.t()`` inside linear) allocate nothing."""
    weight = torch.randn(100, 50)
    x = torch.randn(8, 50)
    result = measure.tensor_peak(lambda: torch.nn.functional.linear(x, weight.t().t()), steps=1)
    assert result["peak"] == 8 * 100 * 4 and result["after"] == 0
