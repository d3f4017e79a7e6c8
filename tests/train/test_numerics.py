"""Non-finite numbers never become a silent result: a NaN loss stops training (keeping the last good
checkpoint), a diverged weight is never checkpointed, and eval refuses NaN logits."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

import deltatune as dt
import deltatune.train.loop as loop
import deltatune.train.runner as runner_module  # where a run builds its runner (make_runner)
from deltatune.cli import app
from deltatune.train.checkpoint import load_checkpoint_step

runner = CliRunner()


def train_args(tiny_bert: Path, tiny_csv: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--set", f"model={tiny_bert}", "--set", "task=classification", "--set", f"data.path={tiny_csv}",
            "--set", "epochs=1", "--set", "batch_size=8", "--set", "adapter.rank=2", "--set", "precision=fp32",
            "--set", "checkpoint_every=2", "--output", str(out), "--no-progress", *extra]


def nan_at_training_call(n: int):
    """A ``make_runner`` whose n-th call in training mode returns a NaN loss."""
    real = loop.make_runner

    def make_runner(device: torch.device, precision: str) -> Any:
        inner, calls = real(device, precision), [0]

        def run(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> Any:
            out = inner(model, batch)
            if model.training:
                calls[0] += 1
                if calls[0] == n:
                    out.loss = out.loss * float("nan")
            return out
        return run
    return make_runner


def test_nan_loss_stops_naming_the_step_and_the_checkpoint_resumes(
        tiny_bert: Path, tiny_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(runner_module, "make_runner", nan_at_training_call(3))
        result = runner.invoke(app, train_args(tiny_bert, tiny_csv, out))
    assert result.exit_code == 2, result.output
    (line,) = [x for x in result.stderr.splitlines() if x.strip()]
    assert line.startswith("error: training stopped at step 3 of 6: the loss is nan")
    assert "last good checkpoint (step 2)" in line and "--resume" in line
    assert not (out / "adapter").exists() and not (out / "metrics.json").exists()
    assert load_checkpoint_step(out / "checkpoint") == 2

    resumed = runner.invoke(app, ["train", "--output", str(out), "--resume", "--no-progress"])
    assert resumed.exit_code == 0, resumed.output
    assert "resumed from" in resumed.output and "at step 2 of 6" in resumed.output
    assert json.loads((out / "metrics.json").read_text())["steps"] == 6


def test_a_diverged_weight_is_never_checkpointed(tiny_bert: Path, tiny_csv: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    real = dt.on_train_step

    def poison(model: torch.nn.Module, step: int, total: int) -> None:
        real(model, step, total)
        if step == 4:  # after the optimizer step, before the step-4 checkpoint
            with torch.no_grad():
                next(p for p in model.parameters() if p.requires_grad).fill_(float("inf"))

    monkeypatch.setattr(dt, "on_train_step", poison)
    result = runner.invoke(app, train_args(tiny_bert, tiny_csv, out))
    assert result.exit_code == 2, result.output
    assert "training stopped at step 4 of 6: parameter" in result.stderr and "holds NaN or inf" in result.stderr
    assert load_checkpoint_step(out / "checkpoint") == 2  # the step-2 checkpoint, not a poisoned step-4 one


def test_eval_refuses_nan_logits(tiny_bert: Path, tiny_csv: Path, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    assert runner.invoke(app, train_args(tiny_bert, tiny_csv, out)).exit_code == 0
    real = loop.make_runner

    def nan_logits(device: torch.device, precision: str) -> Any:
        inner = real(device, precision)

        def run(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> Any:
            res = inner(model, batch)
            res.logits[0, 0] = float("nan")  # one example's logits: still no accuracy
            return res
        return run

    monkeypatch.setattr(loop, "make_runner", nan_logits)
    result = runner.invoke(app, ["eval", str(out)])
    assert result.exit_code == 2, result.output
    assert "NaN or inf logits for" in result.stderr and "no metrics computed" in result.stderr
    assert "accuracy" not in result.stdout
