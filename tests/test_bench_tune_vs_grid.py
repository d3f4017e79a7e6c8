"""``bench.tune_vs_grid``'s grid: summarised from compare's rows, or reused from a previous run's JSON
only when that run had the same settings (no run here)."""

from __future__ import annotations

import json
from pathlib import Path

from bench.tune_vs_grid import grid_summary, recorded_grid


def _row(method: str, test: float, validation: float) -> dict:
    return {"method": method, "status": "ok", "accuracy": test, "train_seconds": 10.0,
            "metrics": {"examples_per_second": 96.0, "validation": [{"accuracy": validation}]}}


def test_grid_summary_picks_by_test_and_by_validation() -> None:
    g = {"seconds": 60.0, "splits": {"train": 960}, "rows": [
        _row("lora", 0.60, 0.70), _row("partial", 0.69, 0.65), {"method": "bitfit", "status": "error"}]}
    s = grid_summary(g)
    assert s["best_method"] == "partial" and s["best_by_validation"]["method"] == "lora"
    assert s["rows"] == 2 and s["examples"] == 1920 and s["splits"] == {"train": 960}


def test_a_recorded_grid_is_reused_only_with_the_same_settings(tmp_path: Path) -> None:
    saved = tmp_path / "tune_vs_grid.json"
    saved.write_text(json.dumps({"settings": ["a=1", "b=2"], "splits": {"train": 960},
                                 "grid": {"best_method": "partial", "examples": 16320}}))
    assert recorded_grid(saved, ["b=2", "a=1"])["best_method"] == "partial"
    assert recorded_grid(saved, ["a=1", "b=3"]) is None
    assert recorded_grid(tmp_path / "missing.json", ["a=1"]) is None
