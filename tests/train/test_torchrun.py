"""``torchrun --nproc_per_node 2 -m deltatune train``: two gloo ranks on CPU train the adapter a
single process trains on the same global batches, and only rank 0 writes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from deltatune.train import load_config, run_training
from deltatune.train.checkpoint import latest_checkpoint
from deltatune.train.ranks import Ranks, step_seed
from tests.train.tiny import make_csv, make_tiny_bert


def test_a_global_batch_is_shared_out_and_never_leaves_a_rank_empty() -> None:
    assert [Ranks(r, 2).share([0, 1, 2, 3, 4]) for r in range(2)] == [[0, 2, 4], [1, 3]]
    assert [Ranks(r, 3).share([5]) for r in range(3)] == [[5], [5], [5]]
    assert Ranks().share([3, 1]) == [3, 1]
    seeds = {step_seed(0, step, rank) for step in range(50) for rank in range(8)}
    assert len(seeds) == 400 and step_seed(1, 0, 0) not in seeds


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _torchrun(out: Path, settings: list[str], *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "deltatune", "train", "--no-progress", "--output", str(out), *extra,
            *(arg for s in settings for arg in ("--set", s))]


def _run(command: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(next((run / "adapter").glob("*.safetensors")))


def test_two_processes_match_one(tmp_path: Path) -> None:
    model = make_tiny_bert(tmp_path / "model", dropout=0.0)  # no dropout: the ranks' draws differ
    data = make_csv(tmp_path / "texts.csv", n=90)
    settings = [f"model={model}", "task=classification", f"data.path={data}", "epochs=2", "batch_size=8",
                "lr=1e-2", "checkpoint_every=3", "adapter.dropout=0.0", "threads=1",
                "precision=fp32"]
    done = _run(_torchrun(tmp_path / "two", settings))
    assert done.stdout.count("trainable of") == 1           # one report, from rank 0

    one = run_training(load_config(None, [*settings, f"output={tmp_path / 'one'}"]), progress=False)
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["processes"] == 2 and one["processes"] == 1
    assert two["steps"] == one["steps"]
    assert two["validation"][-1]["step"] == one["validation"][-1]["step"]
    a, b = _adapter(tmp_path / "one"), _adapter(tmp_path / "two")
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)
    assert (tmp_path / "two" / "checkpoint" / f"step-{two['steps']:09d}" / "state.json").is_file()


def test_an_interrupted_two_process_run_resumes_bit_identical(tmp_path: Path) -> None:
    """Stopped (SIGTERM to torchrun) after a checkpoint, then ``--resume``: the adapter equals an
    uninterrupted run's bit for bit, dropout included (reseeded per step and rank)."""
    model = make_tiny_bert(tmp_path / "model", dropout=0.1)
    data = make_csv(tmp_path / "texts.csv", n=2000)
    settings = [f"model={model}", "task=classification", f"data.path={data}", "epochs=2", "batch_size=8",
                "lr=1e-2", "checkpoint_every=5", "threads=1", "precision=fp32"]
    _run(_torchrun(tmp_path / "whole", settings))

    checkpoints = tmp_path / "cut" / "checkpoint"
    job = subprocess.Popen(_torchrun(tmp_path / "cut", settings), env=ENV,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while job.poll() is None and time.monotonic() < deadline:
        if latest_checkpoint(checkpoints) is not None and latest_checkpoint(checkpoints).name >= "step-000000020":
            break
        time.sleep(0.05)
    job.send_signal(signal.SIGTERM)
    job.wait(timeout=60)
    stopped_at = json.loads((latest_checkpoint(checkpoints) / "state.json").read_text())["step"]
    assert not (tmp_path / "cut" / "adapter").exists(), "the run finished before it could be interrupted"

    done = _run(_torchrun(tmp_path / "cut", settings, "--resume"))
    assert done.stdout.count(f"resumed from {checkpoints} at step {stopped_at} of") == 1
    whole, resumed = _adapter(tmp_path / "whole"), _adapter(tmp_path / "cut")
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
