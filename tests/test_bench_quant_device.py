"""bench/quant_device.py end to end on the CPU with tiny models: the same code path the CUDA run
takes (build and quantize on the device, peak, interleaved timing at two batch sizes, goal rows)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("bitsandbytes")


def test_quant_device_bench_writes_every_figure(tmp_path):
    from bench import quant_device

    out = tmp_path / "q.json"
    quant_device.main(["--device", "cpu", "--quick", "--models", "smollm2", "--setups", "fp32,nf4,peft-nf4",
                       "--rounds", "1", "--large", "2", "--out", str(out)])
    data = json.loads(out.read_text())
    block = data["models"]["smollm2"]
    rows = block["setups"]
    assert set(rows) == {"fp32", "nf4", "peft-nf4"} and data["machine"]["device"] == "cpu"
    for row in rows.values():
        assert row["peak_bytes"] > row["resident_bytes"] > 0 and row["step_s"] > 0 and row["step_large_s"] > 0
    # 4-bit codes plus scales (a large share on 32-wide layers: 0.42x here, 0.13x on SmolLM2)
    assert rows["nf4"]["linear_bytes"] < 0.5 * rows["fp32"]["linear_bytes"]
    assert rows["nf4"]["ratios"]["resident_bytes/fp32"] == rows["nf4"]["resident_bytes"] / rows["fp32"]["resident_bytes"]
    assert {(g["figure"], g["setup"], g["vs"]) for g in block["goals"]} >= {
        ("resident_bytes", "nf4", "fp32"), ("peak_bytes", "nf4", "fp32"), ("step_s", "nf4", "peft-nf4")}
    assert block["workload"]["step_s_rounds"] == 1 and block["workload"]["large_batch"] == 2
