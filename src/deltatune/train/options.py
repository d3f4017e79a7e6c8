"""Training options people expect from a trainer, each a small piece the loop (loop.py) calls.

- ``lr_schedule`` (:func:`lr_at`): linear warm-up over ``warmup_steps`` (or ``warmup_ratio`` of the
  steps), then linear decay to zero, a half cosine to zero, or a constant learning rate.
- ``gradient_accumulation: N``: an optimizer step sees ``N`` micro-batches of ``batch_size``
  examples. Each micro-batch's mean loss is weighted by its share of the step's loss targets
  (:meth:`Task.loss_weight`: examples for classification, reply or text tokens for causal LMs),
  so N micro-batches of b give the gradient of one batch of N*b, up to float rounding.
- ``gradient_checkpointing``: transformers' activation recomputation (non-reentrant, so a frozen
  base with trainable adapters works and dropout replays the same mask).
- ``early_stopping_patience`` / ``early_stopping_metric`` (:class:`EarlyStopping`): stop after that
  many validations without improvement, and end with the best validation's trainable weights.
- ``tensorboard`` (:class:`TensorBoard`): event files in ``OUTPUT/tensorboard`` that
  ``tensorboard --logdir OUTPUT/tensorboard`` shows: training loss and lr per step, validation
  metrics at each validation.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deltatune.train.callbacks import Callback, State

#: Metrics where smaller is better; any other metric (accuracy, f1, rouge...) is maximised.
LOWER_IS_BETTER = ("loss", "perplexity", "error")


def lr_at(step: int, total: int, warmup: int, peak: float, schedule: str = "linear") -> float:
    """The learning rate of optimizer step ``step`` (0-based) of ``total``.

    Linear warm-up to ``peak`` over ``warmup`` steps, then ``linear`` decay to zero at ``total``,
    a half ``cosine`` to zero, or ``constant`` at ``peak``.
    """
    if step < warmup:
        return peak * (step + 1) / warmup
    done = (step - warmup) / max(1, total - warmup)  # 0 at the end of warm-up, 1 at ``total``
    if schedule == "constant":
        return peak
    if schedule == "cosine":
        return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, done)))
    return peak * max(0.0, 1.0 - done)


def warmup_steps(config: Any, total: int) -> int:
    return config.warmup_steps if config.warmup_steps is not None else int(config.warmup_ratio * total)


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Turn on transformers' activation checkpointing (a ``ValueError`` naming the fix if the model has none)."""
    new = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.23's name
    enable = getattr(model, "gradient_checkpointing_enable", None)
    if enable is None or not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"gradient_checkpointing: {type(model).__name__} does not support it (only transformers "
                         "models that declare supports_gradient_checkpointing); remove gradient_checkpointing")
    # Non-reentrant: gradients reach adapter weights inside a block even though the block's input
    # (the frozen embeddings' output) needs no gradient; the RNG state is replayed, so dropout matches.
    if new is not None:
        new(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "config"):
        model.config.use_cache = False  # the cache is useless in training and conflicts with checkpointing


def lower_is_better(metric: str) -> bool:
    return any(word in metric for word in LOWER_IS_BETTER)


class EarlyStopping(Callback):
    """Stop after ``patience`` validations without improvement of ``metric``; keep the best weights.

    After every validation (see :class:`~deltatune.train.callbacks.Validation`), rank 0 compares
    ``metric`` with the best so far; the decision travels to every rank, each of which keeps a copy
    of its trainable parameters and the strategy's state at the best validation. When training ends
    (stopped early or not) those are restored, so the adapter saved is the best one, and
    ``history.best`` records its step and value. A resumed run starts the comparison afresh (the best
    copy lives in memory, not in the checkpoint).
    """

    def __init__(self, patience: int, metric: str) -> None:
        self.patience, self.metric = patience, metric
        self.best_value: float | None = None
        self.best_step: int | None = None
        self.bad = 0
        self.seen = 0  # validations handled so far
        self.snapshot: dict[str, torch.Tensor] | None = None
        self.state_snapshot: dict[str, torch.Tensor] | None = None

    def on_start(self, s: State) -> None:
        self.seen = s.validations

    def on_step(self, s: State) -> None:
        self._check(s)

    def on_epoch_end(self, s: State) -> None:
        self._check(s)

    def _check(self, s: State) -> None:
        if s.validations == self.seen:  # no validation at this step (every rank counts them alike)
            return
        self.seen = s.validations
        decision = 0.0  # 0: worse, 1: improved, 2: stop
        if s.ranks.main:
            latest = s.history.validation[-1]
            if self.metric not in latest:
                known = ", ".join(k for k in latest if k not in ("epoch", "step"))
                raise ValueError(f"early_stopping_metric {self.metric!r} is not a validation metric of task "
                                 f"{s.config.task!r} (it reports: {known}); set one of those")
            value = float(latest[self.metric])
            better = self.best_value is None or (value < self.best_value if lower_is_better(self.metric)
                                                 else value > self.best_value)
            if better:
                self.best_value, self.best_step, self.bad = value, s.step, 0
                decision = 1.0
            else:
                self.bad += 1
                decision = 2.0 if self.bad >= self.patience else 0.0
        decision = round(s.ranks.mean(decision) * s.ranks.world)  # rank 0's value on every rank
        if decision == 1:
            self.snapshot = {n: p.detach().clone() for n, p in s.params.items()}
            self.state_snapshot = {k: v.detach().clone() for k, v in s.strategy.state().items()}
        elif decision == 2:
            s.stop = True
            s.say(f"early stopping at step {s.step}: {self.metric} has not improved for {self.patience} "
                  f"validation(s); keeping step {self.best_step}'s weights ({self.metric} {self.best_value:.4f})")

    def on_end(self, s: State) -> None:
        if self.snapshot is None:
            return
        with torch.no_grad():
            for name, p in s.params.items():
                p.copy_(self.snapshot[name])
        if self.state_snapshot:
            s.strategy.load_state(self.state_snapshot)
        if s.ranks.main:
            s.history.best = {"step": self.best_step, "metric": self.metric, "value": self.best_value,
                              "stopped_early": s.stop}


def tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


class TensorBoard(Callback):
    """Scalars for TensorBoard under ``directory``, written by rank 0: ``train/loss`` and ``train/lr``
    per step, ``validation/<metric>`` at each validation (x axis: optimizer steps)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.writer: Any = None
        self.seen = 0

    def on_start(self, s: State) -> None:
        if not s.ranks.main:
            return
        if not tensorboard_available():
            raise ValueError("tensorboard: true needs the tensorboard package: pip install 'deltatune[tensorboard]' "
                             "(or set tensorboard: false)")
        from torch.utils.tensorboard import SummaryWriter

        self.directory.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(log_dir=str(self.directory))
        self.seen = len(s.history.validation)

    def on_step(self, s: State) -> None:
        if self.writer is None:
            return
        self.writer.add_scalar("train/loss", s.loss, s.step)
        self.writer.add_scalar("train/lr", s.optimizer.param_groups[0]["lr"], s.step)
        self._validations(s)

    def on_epoch_end(self, s: State) -> None:
        if self.writer is not None:
            self._validations(s)
            self.writer.flush()

    def _validations(self, s: State) -> None:
        for entry in s.history.validation[self.seen:]:
            for key, value in entry.items():
                if key not in ("epoch", "step") and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"validation/{key}", value, entry["step"])
        self.seen = len(s.history.validation)

    def close(self, s: State) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def option_callbacks(config: Any, headline: str, out: Path) -> list[Callback]:
    """The callbacks the config's options ask for, in the order the loop runs them."""
    hooks: list[Callback] = []
    if config.early_stopping_patience is not None:
        hooks.append(EarlyStopping(config.early_stopping_patience, config.early_stopping_metric or headline))
    if config.tensorboard or (config.tensorboard is None and tensorboard_available()):
        hooks.append(TensorBoard(out / "tensorboard"))
    return hooks
