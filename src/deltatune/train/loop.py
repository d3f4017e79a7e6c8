"""The training loop, readable in one sitting.

AdamW (or SGD) over the strategy's trainable parameters (strategy.py: every weight, or one
adapter), a linear warm-up then linear decay of the learning rate, gradient clipping, and the
strategy's ``on_step`` after every optimizer step (methods such as AdaLoRA hook their schedules
there). Everything else is a callback (callbacks.py): the progress bar, validation at the end of
each epoch (and every ``eval_every`` steps if set), a checkpoint every ``checkpoint_every`` steps
and at the end of each epoch, and the stop on a non-finite loss.

Resuming is exact: the data order of an epoch is a pure function of (seed, epoch), so we skip the
batches already done; the checkpoint restores the parameters, the optimizer's moments and the RNG
that dropout draws from. A resumed run therefore ends with bit-identical weights.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deltatune.train.callbacks import Callback, Checkpoint, History, NanStop, Progress, State, Validation
from deltatune.train.checkpoint import load_checkpoint
from deltatune.train.config import TrainConfig
from deltatune.train.data import epoch_batches
from deltatune.train.options import enable_gradient_checkpointing, lr_at, option_callbacks, warmup_steps
from deltatune.train.ranks import Ranks, step_seed
from deltatune.train.strategy import Strategy
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
    """``run(model, batch)``: move the batch to ``device`` and run the model (bf16 autocast if asked).

    ``precision`` is resolved here if it is still ``auto`` (a no-op for ``fp32``/``bf16``)."""
    precision = resolve_precision(precision, device)

    def run(model: nn.Module, batch: dict[str, torch.Tensor]) -> Any:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        amp = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
        with amp:
            return model(**batch)
    return run


def make_optimizer(params: list[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def fit(strategy: Strategy, task: Task, tokenizer: Any, items: dict[str, list], config: TrainConfig,
        run: Runner, out: Path, resume: bool = False, progress: bool = True, ranks: Ranks = Ranks(),
        callbacks: Sequence[Callback] = ()) -> History:
    """Train ``strategy.model`` on ``items["train"]``, validating on ``items["validation"]`` each epoch.

    Under torchrun (``ranks.distributed``) each global batch is split across the ranks and the
    model runs inside DistributedDataParallel; rank 0 validates and writes checkpoints.
    ``callbacks`` run after the built-in ones (callbacks.py).
    """
    train = items["train"]
    s = _start(strategy, config, len(train), out / "checkpoint", resume, ranks)
    evaluate = lambda model: task.evaluate(model, items["validation"], tokenizer, config.eval_batch_size, run)  # noqa: E731
    s.validate_sample = lambda n: _in_eval(s, lambda: task.evaluate(s.model, spread(items["validation"], n), tokenizer,
                                                                    config.eval_batch_size, run))
    collate = lambda indices: task.collate([train[i] for i in indices], tokenizer)  # noqa: E731
    options = option_callbacks(config, task.headline, out)  # early stopping, TensorBoard (options.py)
    hooks = [NanStop(), Progress(progress), Validation(evaluate), *options, Checkpoint(), *callbacks]
    step_size = config.batch_size * config.gradient_accumulation  # examples per optimizer step
    try:
        for hook in hooks:
            hook.on_start(s)
        for s.epoch in range(s.step // s.steps_per_epoch, config.epochs):
            # The order of an epoch is a pure function of (seed, epoch): a resumed run skips what was done.
            batches = epoch_batches([task.item_length(it) for it in train], step_size, config.seed, s.epoch)
            s.model.train()
            for indices in batches[s.step - s.epoch * s.steps_per_epoch:]:
                _step(s, indices, collate, task.loss_weight, run, hooks)
                if s.stop:
                    break
            if s.stop:
                break
            for hook in hooks:
                hook.on_epoch_end(s)
            if s.stop:
                break
        for hook in hooks:
            hook.on_end(s)
    finally:
        for hook in hooks:
            hook.close(s)
        s.model.eval()
    return s.history


def spread(items: list, n: int) -> list:
    """``n`` of ``items`` spread evenly over them, in order (all of them if ``n`` is not fewer)."""
    return items if n >= len(items) else [items[i * len(items) // n] for i in range(n)]


def _in_eval(s: State, evaluate: Callable[[], dict[str, float]]) -> dict[str, float]:
    """``evaluate()`` in eval mode, its time counted in the run's seconds as the loop's validations are."""
    t0 = time.perf_counter()
    s.model.eval()
    try:
        return evaluate()
    finally:
        s.model.train()
        s.history.seconds += time.perf_counter() - t0


def _start(strategy: Strategy, config: TrainConfig, examples: int, checkpoints: Path, resume: bool,
           ranks: Ranks) -> State:
    """The loop's state at step 0, or, with ``resume``, as the newest checkpoint left it."""
    params = strategy.trainable_parameters()
    if not params:
        raise ValueError("the model has no trainable parameters; check the method and its target")
    steps_per_epoch = math.ceil(examples / (config.batch_size * config.gradient_accumulation))
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(strategy.model)
    sharded = ranks.distributed and config.strategy == "fsdp"
    if sharded and resume:
        raise ValueError("--resume: strategy fsdp writes no checkpoints to resume from; use strategy ddp")
    trained = _wrap(strategy.model, params, ranks, sharded)
    if sharded:  # fully_shard replaced every parameter with a shard: the optimizer takes those
        params = strategy.trainable_parameters()
    s = State(strategy=strategy, optimizer=make_optimizer(list(params.values()), config), params=params,
              config=config, ranks=ranks, checkpoints=checkpoints, trained=trained,
              total=config.epochs * steps_per_epoch, steps_per_epoch=steps_per_epoch, sharded=sharded)
    if resume:
        meta, state = load_checkpoint(checkpoints, params, s.optimizer)
        if state:  # a checkpoint written before method state was saved holds none: its parameters suffice
            strategy.load_state(state)
        s.step, s.history = meta["step"], History(**meta["history"])
        if ranks.main:
            print(f"resumed from {checkpoints} at step {s.step} of {s.total}")
    return s


def _wrap(model: nn.Module, params: dict[str, nn.Parameter], ranks: Ranks, sharded: bool = False) -> nn.Module:
    """The model in DistributedDataParallel under torchrun (sharded in place by FSDP2's
    ``fully_shard`` with ``strategy: fsdp``, one unit per transformer block), else itself."""
    if not ranks.distributed:
        return model
    if sharded:
        from deltatune.integrations.distributed import shard

        names = set(getattr(model, "_no_split_modules", None) or ())  # transformers' block classes
        return shard(model, blocks={type(m) for m in model.modules() if type(m).__name__ in names})
    from deltatune.integrations.distributed import wrap_ddp

    first = next(iter(params.values()))
    return wrap_ddp(model, device_ids=[first.device.index] if first.device.type == "cuda" else None)


def _step(s: State, indices: list[int], collate: Callable[[list[int]], dict[str, torch.Tensor]],
          weigh: Callable[[dict[str, torch.Tensor]], int], run: Runner, hooks: Sequence[Callback]) -> None:
    """One optimizer step on the global batch ``indices`` (this rank's share of it), in
    ``gradient_accumulation`` micro-batches of at most ``batch_size`` examples."""
    t0, c0 = time.perf_counter(), time.process_time()
    mine = s.ranks.share(indices)
    size = s.config.batch_size
    micro = [collate(mine[i:i + size]) for i in range(0, len(mine), size)]
    weights = [weigh(b) for b in micro]  # the loss targets each micro-batch's mean is over
    # Every micro-batch's mean loss weighted by its share of the step's targets (on all ranks), times
    # the world size since DDP averages the ranks' gradients: the gradient of one mean over the batch.
    total = s.ranks.mean(float(sum(weights))) * s.ranks.world if s.ranks.distributed else sum(weights)
    for group in s.optimizer.param_groups:
        group["lr"] = lr_at(s.step, s.total, warmup_steps(s.config, s.total), s.config.lr, s.config.lr_schedule)
    if s.ranks.distributed:  # per-rank dropout, reproducible on resume
        torch.manual_seed(step_seed(s.config.seed, s.step, s.ranks.rank))
    loss = 0.0
    for i, (batch, weight) in enumerate(zip(micro, weights)):
        last = i == len(micro) - 1
        sync = nullcontext() if last or not hasattr(s.trained, "no_sync") else s.trained.no_sync()
        with sync:  # DDP reduces the gradients once, after the last micro-batch
            part = run(s.trained, batch).loss * (weight * s.ranks.world / max(total, 1))
            extra = s.strategy.extra_loss() if i == 0 else None  # e.g. AdaLoRA's orthogonality penalty
            (part if extra is None else part + extra).backward()
        loss += part.item()
    if s.config.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(list(s.params.values()), s.config.grad_clip)
    s.optimizer.step()
    s.loss = s.ranks.mean(loss)  # where the loop synchronises anyway; every rank sees the mean
    for hook in hooks:
        hook.on_update(s)
    s.step += 1
    s.strategy.on_step(s.step, s.total)  # before zero_grad: some methods read the gradients
    s.optimizer.zero_grad(set_to_none=True)
    s.elapsed, s.examples = time.perf_counter() - t0, len(indices)
    s.history.loss.append(s.loss)
    s.history.seconds += s.elapsed
    used = time.process_time() - c0
    s.history.cpu_seconds += used
    s.history.step_seconds.append(round(s.elapsed, 4))
    s.history.step_cpu_seconds.append(round(used, 4))
    s.history.examples += len(indices)
    for hook in hooks:
        hook.on_step(s)
