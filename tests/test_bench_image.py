"""Smoke test of ``python -m bench.image_merge``: it runs and writes complete JSON (no timing asserted)."""

from __future__ import annotations

import json

from bench import image_merge


def test_image_merge_bench_writes_json(tmp_path):
    out = tmp_path / "b.json"
    image_merge.main(["--random-weights", "--rounds", "1", "--batch", "2", "--size", "16", "--out", str(out)])
    result = json.loads(out.read_text())
    assert set(result["median_s"]) == {"base", "lora-unmerged", "lora-merged"}
    assert result["same_modules"] and result["merged_vs_unmerged_max_abs_logit_diff"] < 1e-3
