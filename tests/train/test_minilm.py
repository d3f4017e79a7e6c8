"""One short integration run on the real all-MiniLM-L6-v2 and the real tweet data (a few dozen examples)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deltatune.train import load_config, load_trained, run_training


@pytest.mark.slow
def test_default_run_on_real_minilm_with_a_few_dozen_tweets(tmp_path: Path) -> None:
    out = tmp_path / "run"
    config = load_config(None, ["data.max_train_examples=48", "data.max_eval_examples=32", "epochs=1",
                                "batch_size=16", f"output={out}"])
    metrics = run_training(config, progress=False)
    assert metrics["steps"] == 3 and metrics["total_parameters"] > 22_000_000
    # LoRA rank 8 on the 37 linear layers (all-linear leaves out the head) + the 3-way head in full
    assert metrics["trainable_parameters"] == 6 * (4 * 6_144 + 2 * 15_360) + 6_144 + 3 * 384 + 3
    assert 0 <= metrics["test_accuracy"] <= 1 and 0 <= metrics["majority_baseline_accuracy"] <= 1
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["modules_to_save"] == ["classifier"]
    trained = load_trained(out)
    assert trained.model.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}
