"""The training loop, readable in one sitting.

AdamW (or SGD) over the trainable parameters only, a linear warm-up then linear decay of the
learning rate, gradient clipping, ``deltatune.on_train_step`` after every optimizer step (methods
such as AdaLoRA hook their schedules there), validation at the end of each epoch
(and every ``eval_every`` steps if set), and a checkpoint every ``checkpoint_every`` steps and at
the end of each epoch.

Resuming is exact: the data order of an epoch is a pure function of (seed, epoch), so we skip the
batches already done; the checkpoint restores the parameters, the optimizer's moments and the RNG
that dropout draws from. A resumed run therefore ends with bit-identical weights.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

import deltatune as dt
from deltatune.train.checkpoint import load_checkpoint, load_checkpoint_step, save_checkpoint, trainable
from deltatune.train.config import TrainConfig
from deltatune.train.data import epoch_batches
from deltatune.train.ranks import Ranks, step_seed
from deltatune.train.task import Task

Runner = Callable[[nn.Module, dict[str, torch.Tensor]], Any]


def pick_device(name: str) -> torch.device:
    """``name`` as a device, checked to exist here (a ``ValueError`` naming the fix if not)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {name!r}: this machine (or this torch build) has no CUDA device; "
                             "use device=auto or device=cpu")
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {name!r}: only {count} CUDA device(s) here (cuda:0..cuda:{count - 1})")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r}: MPS is not available here; use device=auto or device=cpu")
    return device


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes in bfloat16 natively (CUDA with bf16, or a CPU with AVX512-BF16/AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` autocast where the hardware has native bf16 (about 2x faster), else ``fp32``."""
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def make_runner(device: torch.device, precision: str) -> Runner:
    """``run(model, batch)``: move the batch to ``device`` and run the model (bf16 autocast if asked)."""
    precision = resolve_precision(precision, device)

    def run(model: nn.Module, batch: dict[str, torch.Tensor]) -> Any:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        amp = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
        with amp:
            return model(**batch)
    return run


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then linear decay to zero at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * max(0.0, (total - step) / max(1, total - warmup))


@dataclass
class History:
    """What the plot and ``metrics.json`` show: the loss of every step, validation per epoch."""

    loss: list[float] = field(default_factory=list)
    validation: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0   # training wall time, summed over resumed sessions
    examples: int = 0      # training examples seen


def make_optimizer(params: list[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def fit(model: nn.Module, task: Task, tokenizer: Any, items: dict[str, list], config: TrainConfig,
        run: Runner, out: Path, resume: bool = False, progress: bool = True, ranks: Ranks = Ranks()) -> History:
    """Train ``model`` on ``items["train"]``, validating on ``items["validation"]`` each epoch.

    Under torchrun (``ranks.distributed``) each global batch is split across the ranks and the
    model runs inside DistributedDataParallel; rank 0 validates and writes checkpoints.
    """
    train = items["train"]
    params = list(trainable(model).values())
    if not params:
        raise ValueError("the model has no trainable parameters; check the method and its target")
    optimizer = make_optimizer(params, config)
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    total = config.epochs * steps_per_epoch
    warmup = int(config.warmup_ratio * total)
    ckpt_dir = out / "checkpoint"

    step, history = 0, History()
    if resume:
        meta = load_checkpoint(ckpt_dir, model, optimizer)
        step = meta["step"]
        history = History(**meta["history"])
        if ranks.main:
            print(f"resumed from {ckpt_dir} at step {step} of {total}")

    if ranks.distributed:
        from deltatune.integrations.distributed import wrap_ddp

        device_ids = [params[0].device.index] if params[0].device.type == "cuda" else None
        trained: nn.Module = wrap_ddp(model, device_ids=device_ids)
    else:
        trained = model

    def checkpoint() -> None:
        bad = next((n for n, p in zip(trainable(model), params) if not torch.isfinite(p).all()), None)
        if bad is not None:  # never replace the last good checkpoint with a diverged one
            diverged(step, f"parameter {bad!r} holds NaN or inf")
        if ranks.main:
            save_checkpoint(ckpt_dir, model, optimizer, {"step": step, "history": history.__dict__})
        ranks.barrier()  # nobody runs ahead of a checkpoint that may be resumed from

    def validate(epoch: float) -> None:
        if not ranks.main:
            ranks.barrier()
            return
        t0 = time.perf_counter()
        model.eval()
        metrics = task.evaluate(model, items["validation"], tokenizer, config.eval_batch_size, run)
        model.train()
        history.seconds += time.perf_counter() - t0
        history.validation.append({"epoch": round(epoch, 4), "step": step, **metrics})
        bar.write(f"epoch {epoch:.2f}/{config.epochs} (step {step}): "
                  + ", ".join(f"validation {k} {v:.4f}" for k, v in metrics.items()))
        ranks.barrier()

    def diverged(at: int, what: str) -> None:
        """Stop on a non-finite loss or weight (a ValueError: one line under the CLI), keeping the checkpoint."""
        bar.close()
        saved = load_checkpoint_step(ckpt_dir) if ranks.main else None
        where = (f"the last good checkpoint (step {saved}) is intact in {ckpt_dir} and loads with --resume "
                 "(which replays the same steps)" if saved is not None else "no checkpoint was written yet")
        raise ValueError(f"training stopped at step {at} of {total}: {what} (lr {config.lr:g}); {where}; "
                         "to get past it, start afresh with a lower lr or a grad_clip")

    bar = tqdm(total=total, initial=step, unit="step", dynamic_ncols=True, disable=not (progress and ranks.main),
               desc=f"{config.method} on {config.task}")
    smooth: float | None = history.loss[-1] if history.loss else None
    rate: float | None = None  # examples per second
    for epoch in range(step // steps_per_epoch, config.epochs):
        batches = epoch_batches([len(it["input_ids"]) for it in train], config.batch_size, config.seed, epoch)
        model.train()
        for indices in batches[step - epoch * steps_per_epoch:]:
            t0 = time.perf_counter()
            mine = ranks.share(indices)
            batch = task.collate([train[i] for i in mine], tokenizer)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total, warmup, config.lr)
            if ranks.distributed:  # per-rank dropout, reproducible on resume
                torch.manual_seed(step_seed(config.seed, step, ranks.rank))
            # Mean over the batch's targets; on several ranks weighted by this rank's share, so
            # DDP's average of the gradients is the whole batch's.
            loss = run(trained, batch).loss * (len(mine) * ranks.world / max(len(indices), ranks.world))
            extra = dt.regularization_loss(model)  # e.g. AdaLoRA's orthogonality penalty
            (loss if extra is None else loss + extra).backward()
            if config.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            # Read where the loop always synchronised (no extra stall); a NaN step's update is never
            # checkpointed because we stop here, before the next checkpoint. Every rank sees the mean.
            value = ranks.mean(loss.item())
            if not math.isfinite(value):
                diverged(step + 1, f"the loss is {value}")
            step += 1
            dt.on_train_step(model, step, total)  # before zero_grad: some methods read the gradients
            optimizer.zero_grad(set_to_none=True)

            elapsed = time.perf_counter() - t0
            history.loss.append(value)
            history.seconds += elapsed
            history.examples += len(indices)
            # Moving averages, so the bar shows trends rather than one batch's noise.
            smooth = history.loss[-1] if smooth is None else 0.95 * smooth + 0.05 * history.loss[-1]
            rate = len(indices) / elapsed if rate is None else 0.9 * rate + 0.1 * len(indices) / elapsed
            bar.set_postfix(loss=f"{smooth:.4f}", ex_s=f"{rate:.1f}", refresh=False)
            bar.update()
            end_of_epoch = step % steps_per_epoch == 0
            if config.eval_every and step % config.eval_every == 0 and not end_of_epoch:
                validate(epoch + (step % steps_per_epoch) / steps_per_epoch)
            if step % config.checkpoint_every == 0 and not end_of_epoch:
                checkpoint()  # after any validation at this step, so a resumed run never repeats it

        validate(epoch + 1)
        checkpoint()
    bar.close()
    model.eval()
    return history
