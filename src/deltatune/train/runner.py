"""What a training run's model and steps go through, built in one place.

``deltatune train`` (run.py) and ``deltatune plan``'s probe (probe.py) must train the same way, or
the probe predicts another run than the one that follows. Both build their model and their runner
here:

- :func:`prepare_on` quantizes the base as ``quantize`` says (before any adapter attaches), makes it
  trainable as the method says and moves it to the device;
- :func:`training_runner` wraps ``loop.make_runner`` (batch to the device, bf16 autocast) with the
  run's options, innermost first: the frozen linear weights in bf16 (frozen.py), the chunked loss
  (memory.py) and the dropout masks drawn as random bits (dropout.py). Each applies only where its
  ``applies`` says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from deltatune.train.config import TrainConfig
from deltatune.train.dropout import applies as dropout_applies
from deltatune.train.dropout import fast_dropout_runner
from deltatune.train.frozen import applies as frozen_applies
from deltatune.train.frozen import frozen_runner
from deltatune.train.loop import Runner, make_runner
from deltatune.train.memory import apply_loftq, chunked_runner, quantize_base
from deltatune.train.models import prepare
from deltatune.train.strategy import Strategy


def training_runner(config: TrainConfig, device: torch.device, precision: str, distributed: bool = False) -> Runner:
    """``run(model, batch)`` for a run of ``config`` on ``device`` at the resolved ``precision``."""
    run = make_runner(device, precision)
    if frozen_applies(config, precision, distributed):  # frozen linear weights in bf16, made once
        run = frozen_runner(run)
    if config.loss_chunk:
        run = chunked_runner(run, config.loss_chunk)
    if dropout_applies(config, device):  # the model's dropout masks drawn as random bits
        run = fast_dropout_runner(run)
    return run


def prepare_on(loaded: Any, config: TrainConfig, device: torch.device) -> Strategy:
    """``loaded`` (``models.load_model``'s result) quantized, made trainable and moved to ``device``."""
    quantize_base(loaded.model, config, device=device)  # before the adapter attaches; no-op for quantize: none
    strategy = prepare(loaded, config)
    apply_loftq(loaded.model)  # loftq_iterations: LoRA starts from LoftQ's A, B (a no-op otherwise)
    loaded.model.to(device)
    return strategy


def dir_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (an adapter's size on disk)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
