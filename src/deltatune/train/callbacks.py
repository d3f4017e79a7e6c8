"""What happens around the optimizer steps: callbacks that see the loop's :class:`State`.

The loop (loop.py) calls, in list order, ``on_start`` once, ``on_update`` after each
``optimizer.step()`` (before the step counts), ``on_step`` after it counts, ``on_epoch_end``, ``on_end`` once training finished, and
``close`` always, even on an error. The built-in ones, in the order the loop runs them:

- :class:`NanStop`: a non-finite loss stops the run, naming the step and the last good checkpoint;
- :class:`Progress`: the tqdm bar, with moving averages of the loss and examples per second;
- :class:`Validation`: every ``eval_every`` steps and at the end of each epoch (rank 0 alone);
- :class:`Checkpoint`: every ``checkpoint_every`` steps and at the end of each epoch, after any
  validation at that step (so a resumed run never repeats it); rank 0 alone writes, and a
  diverged weight is never written.

A callback stops training early by setting ``state.stop`` (the hook for early stopping).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from deltatune.train.checkpoint import load_checkpoint_step, save_checkpoint
from deltatune.train.config import TrainConfig
from deltatune.train.ranks import Ranks
from deltatune.train.strategy import Strategy


@dataclass
class History:
    """What the plot and ``metrics.json`` show: the loss of every step, validation per epoch."""

    loss: list[float] = field(default_factory=list)
    validation: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0   # training wall time, summed over resumed sessions
    cpu_seconds: float = 0.0  # the process's CPU time in those steps: their work, whatever else runs beside them
    step_seconds: list[float] = field(default_factory=list)  # wall time of every step
    step_cpu_seconds: list[float] = field(default_factory=list)  # CPU time of every step (plan's accuracy bench)
    examples: int = 0      # training examples seen
    best: dict[str, Any] | None = None  # early stopping: the kept validation's step, metric and value


@dataclass
class State:
    """Where training is: what the loop and its callbacks share."""

    strategy: Strategy
    optimizer: torch.optim.Optimizer
    params: dict[str, nn.Parameter]  # the trainable parameters, by name
    config: TrainConfig
    ranks: Ranks
    checkpoints: Path                # out/checkpoint
    trained: nn.Module               # the model, or its DDP wrapper under torchrun
    total: int                       # optimizer steps in the whole run
    steps_per_epoch: int
    step: int = 0                    # optimizer steps done
    epoch: int = 0
    history: History = field(default_factory=History)
    loss: float = math.nan           # the last step's loss (the mean over ranks)
    examples: int = 0                # in the last step's batch
    elapsed: float = 0.0             # seconds the last step took
    stop: bool = False               # set by a callback to end training after this step
    validations: int = 0             # validations run so far in this session (counted on every rank)
    sharded: bool = False            # strategy fsdp under torchrun: every forward is a collective of all ranks
    say: Callable[[str], Any] = print
    # ``validate_sample(n)``: metrics on ``n`` validation items spread evenly over the split (all if fewer),
    # for a callback that validates cheaply between the loop's own validations (tune's early rungs).
    validate_sample: Callable[[int], dict[str, float]] | None = None

    @property
    def model(self) -> nn.Module:
        return self.strategy.model

    @property
    def end_of_epoch(self) -> bool:
        return self.step % self.steps_per_epoch == 0


class Callback:
    def on_start(self, s: State) -> None: ...
    def on_update(self, s: State) -> None: ...
    def on_step(self, s: State) -> None: ...
    def on_epoch_end(self, s: State) -> None: ...
    def on_end(self, s: State) -> None: ...  # training finished (not called on an error)
    def close(self, s: State) -> None: ...


def diverged(s: State, at: int, what: str) -> ValueError:
    """The error that stops a diverged run (one line under the CLI), naming the intact checkpoint."""
    saved = load_checkpoint_step(s.checkpoints) if s.ranks.main else None
    where = (f"the last good checkpoint (step {saved}) is intact in {s.checkpoints} and loads with --resume "
             "(which replays the same steps)" if saved is not None else "no checkpoint was written yet")
    return ValueError(f"training stopped at step {at} of {s.total}: {what} (lr {s.config.lr:g}); {where}; "
                      "to get past it, start afresh with a lower lr or a grad_clip")


class NanStop(Callback):
    """A non-finite loss stops the run before its step counts: that update is never checkpointed."""

    def on_update(self, s: State) -> None:
        if not math.isfinite(s.loss):
            raise diverged(s, s.step + 1, f"the loss is {s.loss}")


class Progress(Callback):
    """The bar shows moving averages, so it shows trends rather than one batch's noise."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.smooth: float | None = None
        self.rate: float | None = None  # examples per second

    def on_start(self, s: State) -> None:
        self.bar = tqdm(total=s.total, initial=s.step, unit="step", dynamic_ncols=True,
                        disable=not (self.enabled and s.ranks.main), desc=f"{s.config.method} on {s.config.task}")
        s.say = self.bar.write
        self.smooth = s.history.loss[-1] if s.history.loss else None

    def on_step(self, s: State) -> None:
        rate = s.examples / max(s.elapsed, 1e-9)
        self.smooth = s.loss if self.smooth is None else 0.95 * self.smooth + 0.05 * s.loss
        self.rate = rate if self.rate is None else 0.9 * self.rate + 0.1 * rate
        self.bar.set_postfix(loss=f"{self.smooth:.4f}", ex_s=f"{self.rate:.1f}", refresh=False)
        self.bar.update()

    def close(self, s: State) -> None:
        if hasattr(self, "bar"):
            self.bar.close()


class Validation(Callback):
    """``evaluate(model) -> metrics`` every ``eval_every`` steps and at each epoch's end, on rank 0."""

    def __init__(self, evaluate: Callable[[nn.Module], dict[str, float]]) -> None:
        self.evaluate = evaluate

    def on_step(self, s: State) -> None:
        every = s.config.eval_every
        if every and s.step % every == 0 and not s.end_of_epoch:
            self.validate(s, s.epoch + (s.step % s.steps_per_epoch) / s.steps_per_epoch)

    def on_epoch_end(self, s: State) -> None:
        self.validate(s, s.epoch + 1)

    def validate(self, s: State, epoch: float) -> None:
        s.validations += 1
        if s.ranks.main or s.sharded:  # sharded: every rank runs the forward passes, rank 0 records
            t0 = time.perf_counter()
            s.model.eval()
            metrics = self.evaluate(s.model)
            s.model.train()
        if s.ranks.main:
            s.history.seconds += time.perf_counter() - t0
            s.history.validation.append({"epoch": round(epoch, 4), "step": s.step, **metrics})
            s.say(f"epoch {epoch:.2f}/{s.config.epochs} (step {s.step}): "
                  + ", ".join(f"validation {k} {v:.4f}" for k, v in metrics.items()))
        s.ranks.barrier()


class Checkpoint(Callback):
    """Everything needed to continue exactly: parameters, the strategy's state, optimizer, RNG, history."""

    def on_step(self, s: State) -> None:
        if s.step % s.config.checkpoint_every == 0 and not s.end_of_epoch:
            self.save(s)

    def on_epoch_end(self, s: State) -> None:
        self.save(s)

    def save(self, s: State) -> None:
        if s.sharded:  # the parameters and the optimizer's moments are shards: not written (see options.py)
            return
        bad = next((n for n, p in s.params.items() if not torch.isfinite(p).all()), None)
        if bad is not None:  # never replace the last good checkpoint with a diverged one
            raise diverged(s, s.step, f"parameter {bad!r} holds NaN or inf")
        if s.ranks.main:
            save_checkpoint(s.checkpoints, s.params, s.optimizer, {"step": s.step, "history": s.history.__dict__},
                            s.strategy.state())
        s.ranks.barrier()  # nobody runs ahead of a checkpoint that may be resumed from
