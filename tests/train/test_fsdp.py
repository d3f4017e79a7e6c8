"""``strategy: fsdp`` under torchrun: two gloo ranks shard the frozen base and the adapter (FSDP2),
validate and score together, and rank 0 writes the adapter one process trains."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from deltatune.train import load_config, run_training
from tests.train.test_torchrun import _adapter, _run, _torchrun
from tests.train.tiny import make_csv, make_tiny_bert


def test_fsdp_two_processes_match_one(tmp_path: Path) -> None:
    model = make_tiny_bert(tmp_path / "model", dropout=0.0)
    data = make_csv(tmp_path / "texts.csv", n=60)
    settings = [f"model={model}", "task=classification", f"data.path={data}", "epochs=1", "batch_size=8",
                "lr=1e-2", "adapter.dropout=0.0", "threads=1", "precision=fp32", "tensorboard=false",
                "eval_every=3"]
    done = _run(_torchrun(tmp_path / "two", [*settings, "strategy=fsdp"]))
    assert done.stdout.count("trainable of") == 1
    one = run_training(load_config(None, [*settings, f"output={tmp_path / 'one'}"]), progress=False)
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["processes"] == 2 and two["steps"] == one["steps"] == 6
    assert [v["step"] for v in two["validation"]] == [3, 6]
    assert two["validation"][-1]["loss"] == pytest.approx(one["validation"][-1]["loss"], rel=1e-4)
    assert two["test_accuracy"] == one["test_accuracy"]
    a, b = _adapter(tmp_path / "one"), _adapter(tmp_path / "two")
    assert a.keys() == b.keys() and a
    for name in a:  # the same files as one process: full tensors, not shards
        assert b[name].shape == a[name].shape
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)
    assert sorted(p.name for p in (tmp_path / "two" / "adapter").iterdir()) == sorted(
        p.name for p in (tmp_path / "one" / "adapter").iterdir())


def test_fsdp_refuses_full_fine_tuning() -> None:
    with pytest.raises(ValueError, match="strategy fsdp shards a frozen base for an adapter"):
        load_config(None, ["strategy=fsdp", "method=full"])
