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


def test_image_compare_bench_chooses_on_validation_and_writes_json(tmp_path):
    """``python -m bench.image_compare`` on tiny pictures: the sweep picks the lr with the best validation
    accuracy (not test), variants run as compares, and every row is in the JSON."""
    import pytest

    pytest.importorskip("PIL")
    from bench import image_compare
    from tests.train.images import image_folder

    folder = image_folder(tmp_path / "pictures")
    out = tmp_path / "c.json"
    common = ["--size", "16", "--train", "20", "--epochs", "1", "--runs", str(tmp_path / "runs"), "--json", str(out),
              "--set", "model=tiny-resnet", "--set", f"data.path={folder}", "--set", "batch_size=8",
              "--set", "data.validation_fraction=0.2", "--set", "data.test_fraction=0.2"]
    image_compare.main([*common, "--stage", "sweep", "--full-lrs", "1e-3,1e-2"])
    image_compare.main([*common, "--stage", "variants", "--variant", "smoke:lora:set=data.image.batchnorm=affine"])
    result = json.loads(out.read_text())
    sweep = result["full_lr_sweep"]
    assert [r["lr"] for r in sweep["rows"]] == [1e-3, 1e-2] and all(r["status"] == "ok" for r in sweep["rows"])
    best = max(sweep["rows"], key=lambda r: r["validation_accuracy"])
    assert sweep["chosen_lr"] == best["lr"]
    (row,) = result["variants"]["smoke"]["rows"]
    assert row["status"] == "ok" and row["batchnorm"] == "affine" and 0 < row["trainable_share"] < 1
    assert "--set data.image.batchnorm=affine" in result["variants"]["smoke"]["command"]
