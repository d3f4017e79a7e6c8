"""Every registered method resumes exactly: an interrupted-and-resumed run equals an uninterrupted one.

For full fine-tuning (on the zoo CNN) and each method in ``deltatune.METHODS`` (with dropout on
where the method has it), on the first zoo model it applies to, the library-level loop (``fit``) trains 2 epochs of 3 steps. Once
straight through; once interrupted after step 5 (the newest checkpoint is step 4), then continued
with ``resume`` on a freshly built model. Every tensor of the two models must be bit-identical:
so a checkpoint must carry all the state a method changes while training (parameters, buffers
such as AdaLoRA's rank mask, and what an adapter declares as ``TrainingState``, such as
AdaLoRA's importance averages). Nothing here names a method.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import deltatune as dt
from deltatune.core.contract import TrainingState
from deltatune.train.callbacks import Callback, State
from deltatune.train.checkpoint import TENSORS, latest_checkpoint
from deltatune.train.config import validate_config
from deltatune.train.loop import fit
from deltatune.train.strategy import AdapterStrategy, FullStrategy
from deltatune.train.task import Task
from tests.models import ZOO, ZooModel


def _config(method: str) -> dt.AdapterConfig:
    config = dt.METHODS[method]()
    if "dropout" in {f.name for f in dataclasses.fields(config)}:
        config = dataclasses.replace(config, dropout=0.1)
    return config


@functools.cache
def _first_model(method: str) -> str:
    """The first zoo model the method finds something to adapt in (as test_conformance decides)."""
    for name, zoo in ZOO.items():
        try:
            dt.attach(zoo.build(), _config(method))
        except dt.NoMatchError:
            continue
        return name
    raise AssertionError(f"{method} applies to no zoo model")


class ZooTask(Task):
    """The least of a Task that ``fit`` needs (the base class's defaults for the rest): batches of zoo
    inputs, loss = mean square of the output."""

    def __init__(self, zoo: ZooModel) -> None:
        self.zoo = zoo

    def collate(self, items: list[dict[str, Any]], tokenizer: Any) -> dict[str, torch.Tensor]:
        return {k: torch.stack([it[k] for it in items]) for k, v in items[0].items() if isinstance(v, torch.Tensor)}

    def evaluate(self, model: nn.Module, items: list[dict[str, Any]], tokenizer: Any, batch_size: int,
                 run: Any) -> dict[str, float]:
        with torch.no_grad():
            return {"loss": run(model, self.collate(items, tokenizer)).loss.item()}


def _examples(zoo: ZooModel, n: int = 6) -> list[dict[str, Any]]:
    sample, g = zoo.inputs(), torch.Generator().manual_seed(2)
    if isinstance(sample, dict):  # token ids, (T,) each
        ids = [torch.randint(1, 100, sample["input_ids"].shape[1:], generator=g) for _ in range(n)]
        return [{"input_ids": i, "attention_mask": torch.ones_like(i)} for i in ids]
    return [{"input_ids": [0], "x": torch.randn(sample.shape[1:], generator=g)} for _ in range(n)]


def _runner(zoo: ZooModel) -> Any:
    def run(model: nn.Module, batch: dict[str, torch.Tensor]) -> Any:
        out = zoo.run(model, batch["x"] if "x" in batch else batch)
        return SimpleNamespace(loss=out.float().pow(2).mean())
    return run


class Interrupt(Callback):
    def on_step(self, s: State) -> None:
        if s.step == 5:
            raise KeyboardInterrupt


def _train(method: str, out: Path, resume: bool = False, interrupt: bool = False) -> nn.Module:
    zoo = ZOO["cnn" if method == "full" else _first_model(method)]
    model = zoo.build(seed=0).train()
    torch.manual_seed(1)  # the adapter's initialisation and the dropout draws (restored on resume)
    strategy = FullStrategy() if method == "full" else AdapterStrategy(_config(method))
    strategy.prepare(model)
    config = validate_config({"method": "lora", "epochs": 2, "batch_size": 2, "eval_batch_size": 2, "lr": 1e-2,
                              "checkpoint_every": 2, "precision": "fp32", "seed": 0})
    items = _examples(zoo)
    fit(strategy, ZooTask(zoo), None, {"train": items, "validation": items[:2]}, config, _runner(zoo), out,
        resume=resume, progress=False, callbacks=[Interrupt()] if interrupt else [])
    return model


@pytest.mark.parametrize("method", ["full", *sorted(dt.METHODS)])
def test_an_interrupted_run_resumes_bit_identically(method: str, tmp_path: Path) -> None:
    whole = _train(method, tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        _train(method, tmp_path / "split", interrupt=True)
    newest = latest_checkpoint(tmp_path / "split" / "checkpoint")
    assert newest is not None and newest.name == "step-000000004"
    saved = load_file(str(newest / TENSORS)).keys()
    resumed = _train(method, tmp_path / "split", resume=True)
    a, b = whole.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{method}: {len(differ)} tensors differ after resuming, e.g. {differ[0]}"
    assert any(p.requires_grad for p in whole.parameters()), f"{method}: nothing trained"
    if any(isinstance(m, TrainingState) for m in resumed.modules()):  # declared state is in the checkpoint
        assert any("~" in k for k in saved), f"{method}: its TrainingState is not in the checkpoint"
