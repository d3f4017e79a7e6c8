"""One training run from a validated config to a directory of results.

``run_training(config)`` loads the data first (so a bad file fails before the model loads), then
the model, makes it trainable as the method says, trains, scores the test split, and writes::

    OUTPUT/
      config.yaml        the resolved config (every default spelled out)
      adapter/           the adapter (``deltatune.save_adapter``), or model/ for method: full
      metrics.json       test metrics, baselines, parameter counts, time, memory
      training.png       training loss and validation metrics
      checkpoint/        the last checkpoint (for --resume): step-<N>/, see checkpoint.py
      .deltatune.lock    held while a run writes here (see output.py)

The directory must be new, empty or a deltatune run; a run there is continued with ``resume``
or replaced with ``overwrite`` (only what deltatune wrote goes), see :mod:`deltatune.train.output`.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

import deltatune as dt
from deltatune.core.files import write_text_atomic
from deltatune.train.callbacks import Callback, History
from deltatune.train.checkpoint import latest_checkpoint
from deltatune.train.config import TrainConfig, to_yaml, validate_config
from deltatune.train.loop import fit, pick_device, resolve_precision
from deltatune.train.metrics import peak_memory_mb, step_times
from deltatune.train.models import load_model, training_meta
from deltatune.train.output import claim_output, remove_run, unclaim_output
from deltatune.train.ranks import Ranks, finish, start
from deltatune.train.report import plot_history, write_metrics
from deltatune.train.runner import dir_bytes, prepare_on, training_runner
from deltatune.train.strategy import Strategy
from deltatune.train.task import Task
from deltatune.train.tasks import get_task

CONFIG_FILE = "config.yaml"


def read_run_config(out: Path) -> TrainConfig | None:
    """The config a run in ``out`` recorded (validated), or None if it has none."""
    saved_file = out / CONFIG_FILE
    if not saved_file.is_file():
        return None
    return validate_config(yaml.safe_load(saved_file.read_text()), source=str(saved_file))


def _check_resume(out: Path, config: TrainConfig, recorded: TrainConfig | None) -> None:
    """``recorded``: the run's config if the caller has read it already (so it is validated once)."""
    recorded = recorded or read_run_config(out)
    if latest_checkpoint(out / "checkpoint") is None or recorded is None:
        raise ValueError(f"--resume: {out} holds no checkpoint; run without --resume to start afresh")
    saved = recorded.model_dump(mode="json")
    now = config.model_dump(mode="json")
    changed = [k for k in now if k != "output" and now[k] != saved.get(k)]
    if changed:
        raise ValueError(f"--resume: {changed[0]!r} differs from the run in {out} "
                         f"({saved.get(changed[0])!r} there, {now[changed[0]]!r} now); use the same config")


def run_training(config: TrainConfig, resume: bool = False, progress: bool = True,
                 overwrite: bool = False, recorded: TrainConfig | None = None,
                 callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """Train as ``config`` says and write the results under its output directory. Returns the metrics.

    ``overwrite`` replaces a run already in the output directory (removing only what deltatune
    wrote there); without it, or ``resume``, such a directory is refused. ``recorded``: with
    ``resume``, the run's own config if the caller has read it (:func:`read_run_config`) already.
    ``callbacks`` run in the loop after the built-in ones (``deltatune tune`` reports and prunes there).
    """
    pick_device(config.device)  # a device this machine lacks is bad input: refused before the directory is claimed
    out = config.resolved_output()
    new = not out.exists()
    created = [d for d in (out, *out.parents) if not d.exists()]  # what claiming makes, innermost first
    empty = new or (out.is_dir() and not any(out.iterdir()))
    # Rank 0 alone writes, so it alone claims the directory (before joining: a refusal ends torchrun).
    lock = claim_output(out, resume, overwrite) if os.environ.get("RANK", "0") == "0" else None
    try:
        if resume:
            _check_resume(out, config, recorded)
        ranks = start(config.device)  # under torchrun: join the process group (ranks.py)
        try:
            with dt.cpu_engine(config.cpu_engine):  # the fused kernels' CPU products, restored afterwards
                return _run_training(config, resume, progress, ranks, callbacks)
        finally:
            finish(ranks)
    except BaseException:
        if lock is not None and empty:
            unclaim_output(out, created)  # a run that stopped before writing anything leaves nothing behind
        raise
    finally:
        if lock is not None:
            lock.release()


def _quiet(*args: Any, **kwargs: Any) -> None:
    pass


def _run_training(config: TrainConfig, resume: bool, progress: bool, ranks: Ranks = Ranks(),
                  callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """The run itself; on several processes every rank trains, rank 0 alone reports and writes
    (the others return an empty dict)."""
    out, say = config.resolved_output(), print if ranks.main else _quiet
    device, precision = _device(config, ranks)
    task = get_task(config.task)
    started = time.perf_counter()
    splits = task.load_splits(config)  # before the model: a bad file fails first
    say(f"task {config.task}: {splits.sizes()}" + (f", labels {splits.labels}" if splits.labels else ""))
    strategy, tokenizer = _load(config, task, splits.labels, device, ranks)
    say(strategy.report())
    processes = f", {ranks.world} processes" if ranks.distributed else ""
    say(f"device {device}, torch threads {torch.get_num_threads()}, precision {precision}{processes}")
    items = {name: task.encode(tokenizer, getattr(splits, name), config.max_length)
             for name in ("train", "validation", "test")}
    _begin_output(out, config, resume, ranks, say)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    run = training_runner(config, device, precision, ranks.distributed)  # runner.py: the run's options
    history = fit(strategy, task, tokenizer, items, config, run, out, resume=resume, progress=progress, ranks=ranks,
                  callbacks=callbacks)
    sharded = ranks.distributed and config.strategy == "fsdp"  # every forward and the save are collectives
    if not ranks.main and not sharded:
        ranks.barrier()  # rank 0 scores the test split and writes the results
        return {}
    metrics = task.final_metrics(strategy.model, splits, items, tokenizer, config, run)
    artifact = strategy.save(out, tokenizer, training_meta(config, splits.labels), config.save_format)
    if not ranks.main:
        ranks.barrier()
        return {}
    task.write_run_files(out, artifact, tokenizer)
    metrics.update(_facts(strategy, artifact, history, device, precision, ranks, started, resume))
    write_metrics(out / "metrics.json", metrics)
    plot_history(out / "training.png", history, task.headline, f"{config.method} · {config.model} · {config.task}")
    print(task.summary(metrics))
    print(f"{metrics['trainable_parameters']:,} trainable of {metrics['total_parameters']:,} parameters; "
          f"trained {metrics['train_seconds']:.0f} s ({metrics['steps_per_second']:.2f} steps/s); "
          f"peak memory {metrics['peak_memory_mb']:.0f} MiB; results in {out}")
    ranks.barrier()  # the others return once the results are on disk (a failure here: torchrun stops them)
    return metrics


def _device(config: TrainConfig, ranks: Ranks) -> tuple[torch.device, str]:
    """The device this rank trains on and the precision, resolved once (``auto`` -> fp32 or bf16)."""
    if config.threads:
        torch.set_num_threads(config.threads)
    device = pick_device(config.device)
    if ranks.distributed and device.type == "cuda":
        device = torch.device("cuda", ranks.local_rank)
    return device, resolve_precision(config.precision, device)


def _load(config: TrainConfig, task: Task, labels: list[str] | None, device: torch.device,
          ranks: Ranks) -> tuple[Strategy, Any]:
    """The base model made trainable as the method says, on ``device``, and its tokenizer."""
    torch.manual_seed(config.seed)  # the new head and the adapter start from the seed
    with ranks.main_first():  # a first load may write a cache (SmolLM2's conversion)
        loaded = load_model(config.model, task, labels, config)
    return prepare_on(loaded, config, device), loaded.tokenizer


def _begin_output(out: Path, config: TrainConfig, resume: bool, ranks: Ranks, say: Callable[[str], Any]) -> None:
    """A fresh run clears what an earlier run wrote (claim_output allowed it) and records its config."""
    if ranks.main and not resume:
        removed = remove_run(out)  # something only with overwrite: claim_output refused the rest
        if removed:
            say(f"starting afresh in {out}: removed what the run there wrote ({', '.join(removed)})")
        write_text_atomic(out / CONFIG_FILE, to_yaml(config))
    ranks.barrier()


def _facts(strategy: Strategy, artifact: Path, history: History, device: torch.device, precision: str,
           ranks: Ranks, started: float, resume: bool) -> dict[str, Any]:
    """What metrics.json says about the run besides the task's metrics."""
    params = dt.parameter_report(strategy.model)
    peak, peak_note = peak_memory_mb(device)
    seconds = max(history.seconds, 1e-9)
    return {
        "trainable_parameters": params.trainable,
        "total_parameters": params.total,
        "adapter_bytes": dir_bytes(artifact),
        "train_seconds": round(history.seconds, 2),
        "train_cpu_seconds": round(history.cpu_seconds, 2),  # the process's CPU time in the steps (all threads)
        "step_times": step_times(history.step_seconds),
        "step_cpu_times": step_times(history.step_cpu_seconds),  # the same, as CPU seconds
        "total_seconds": round(time.perf_counter() - started, 2),
        "steps": len(history.loss),
        "steps_per_second": round(len(history.loss) / seconds, 3),
        "examples_per_second": round(history.examples / seconds, 2),
        "peak_memory_mb": round(peak, 1),
        "peak_memory_measure": peak_note,
        "device": str(device),
        "precision": precision,
        "torch_threads": torch.get_num_threads(),
        "processes": ranks.world,
        "cpu_count": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "validation": history.validation,
        **({"early_stopping": history.best} if history.best else {}),
        "resumed": resume,
    }
