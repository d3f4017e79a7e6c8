"""Measure what a training run will cost before running it: a short probe plus a calibrated model.

For each candidate (a method and its settings, ``space.Candidate``) the probe does what
``deltatune train`` does, for a few steps only, in this process:

1. loads the model as the run would (the first candidate's load also gives the peak of loading)
   and touches every weight, so weights that safetensors mapped from disk are paged in now (a
   run pages them in during its first step; a baseline taken before would miss them);
2. makes it trainable (``prepare``), and builds the loop's own state (``loop._start``: the same
   optimizer, schedule and strategy hooks as a run);
3. takes one optimizer step on the batch of the *longest* training examples (the worst case for
   activation memory; it is also the warm-up), then ``steps`` timed steps on the first batches
   of the run's own epoch order (``data.epoch_batches``), then one validation batch of the
   longest examples;
4. saves the result as the run would (``strategy.save``), for its exact size.

Then the model:

- **trainable parameters, adapter bytes**: exact (counted on the prepared model, measured on disk).
- **peak memory**: what ``metrics.json`` calls ``peak_memory_mb``. On CUDA: the allocator's peak
  (``max_memory_allocated``) over the probe. On CPU: the process's peak resident set size. One
  process probes many candidates, so the peak is taken per candidate from a reset high-water mark
  (``/proc/self/clear_refs``), once over the steps and once over the evaluation batch. A CPU run's
  resident memory is built of four parts, each read from the probe (``train/peak_memory.py``: :func:`cpu_peak`):
  what stays (optimizer state, the adapter, gradient storage: resident after the steps once freed
  memory is handed back with ``malloc_trim``); the heap the steps freed but glibc did not hand back
  (resident between steps, beyond what stays), which a whole run grows by ``heap_growth(steps)``,
  counting the steps until the run has met all its batch shapes (a shape met again reuses the holes
  its first occurrence left);
  what every *new batch shape* adds for good (kernels and their caches built per shape, read from
  glibc's in-use bytes around each timed step: :func:`shape_cost`), times the shapes the run will
  meet that the probe did not (:func:`batch_shapes` over all the run's epochs); and on top, the larger
  of a step's and the evaluation batch's transients above the heap (large tensors, which glibc maps
  and unmaps). Freed memory is also handed back between candidates so one candidate's leftovers do
  not hide the next's.
- **step time**: the median over the timed steps of seconds per padded token, times the mean padded
  tokens of a batch over the run's epoch (batches hold texts of similar length, so they differ);
  the warm-up step is not timed. This is wall time at the machine's load while the probe ran; the
  same from the process's CPU time (``step_cpu_seconds``: the step's work, whatever else runs) and
  the probe's CPU share (CPU / wall) say how much of it was waiting for a core. A run reports the
  same pair (``train_seconds``, ``train_cpu_seconds``), so predictions can be checked on a shared
  machine whose load changes between the probe and the run. Step time is the *steady* step: a run's
  first step also pays one-off costs (optimizer state first touched, lazy kernels), predicted
  separately from the warm-up step (:func:`first_step_extra`; ``first_step_extra_seconds``) and
  compared with a run's steps after the first (``step_times.mean_after_first``).
  **Epoch and run time**: step time x steps per epoch (x epochs), the run's plus the first step's
  extra: the steps alone (a run's ``train_seconds`` also counts its validations; its ``step_times`` do not).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import deltatune as dt
from deltatune.train.config import TrainConfig, validate_config
from deltatune.train.data import epoch_batches
from deltatune.train.loop import _start, _step, pick_device, resolve_precision
from deltatune.train.models import load_model, training_meta
from deltatune.train.peak_memory import (MiB, Meter, batch_shapes, cpu_peak, heap_growth, heap_in_use, release,
                                         shape_cost)
from deltatune.train.ranks import Ranks
from deltatune.train.runner import dir_bytes, prepare_on, training_runner
from deltatune.train.space import Candidate
from deltatune.train.tasks import get_task


def touch(model: torch.nn.Module) -> None:
    """Read every weight once, so memory-mapped weights are resident before a baseline is taken."""
    with torch.no_grad():
        for t in (*model.parameters(), *model.buffers()):
            if t.numel():
                t.detach().float().sum() if t.is_floating_point() else t.detach().sum()


def _tokens(items: list[dict[str, Any]], batch: list[int]) -> int:
    """Padded tokens of a batch: its size times its longest example (``data.pad``)."""
    return len(batch) * max(len(items[i]["input_ids"]) for i in batch)


def time_steps(s: Any, batches: list[list[int]], collate: Callable, weigh: Callable, run: Any,
               tokens: Callable[[list[int]], int]) -> dict[str, Any]:
    """Take one optimizer step per batch; per step the wall and the CPU seconds per padded token, and
    the rise in malloc's in-use bytes (:func:`heap_in_use`, read outside the timed part; None without glibc).

    CPU time (``time.process_time``, all the process's threads) is the step's work whatever else
    runs on the machine; wall time is that work divided by the share of the CPU the process got.
    ``cpu_share`` (CPU / wall over the steps) says how loaded the machine was while the probe ran."""
    rates, cpu_rates, growth, wall, cpu = [], [], [], 0.0, 0.0
    for batch in batches:
        before = heap_in_use()
        c0 = time.process_time()
        _step(s, batch, collate, weigh, run, [])
        used = time.process_time() - c0
        after = heap_in_use()
        growth.append(None if before is None or after is None else after - before)
        wall, cpu = wall + s.elapsed, cpu + used
        rates.append(s.elapsed / tokens(batch))
        cpu_rates.append(used / tokens(batch))
    return {"rates": rates, "cpu_rates": cpu_rates, "heap_growth": growth,
            "cpu_share": round(cpu / wall, 3) if wall else None}


def first_step_extra(warm: dict[str, float], timing: dict[str, Any]) -> dict[str, float]:
    """What a run's first step costs beyond a steady step, wall and CPU seconds: the warm-up step's
    time less what its batch costs at the timed steps' median rate (per padded token), at least 0.

    The first optimizer step pays once for what later steps reuse: the optimizer's state allocated
    and first touched (AdamW: two tensors the size of the trainable parameters; for full fine-tuning
    of 135 M parameters that step took 2x a later one), lazily built kernels, the heap's first
    growth. ``warm`` is the probe's warm-up step (``wall``, ``cpu`` seconds, its padded ``tokens``).
    In a plan of several candidates in one process, later candidates find the process warm, so
    theirs is a lower bound."""
    return {key: max(0.0, warm[key] - statistics.median(timing[rates]) * warm["tokens"])
            for key, rates in (("wall", "rates"), ("cpu", "cpu_rates"))}


class Prober:
    """Probes candidates on one task and data set; the data and the first model load happen once."""

    def __init__(self, base: dict[str, Any], steps: int = 3, say: Callable[[str], Any] = print) -> None:
        if steps < 1:
            raise ValueError(f"the probe needs at least 1 timed step, got {steps}")
        self.base, self.steps, self.say = dict(base), steps, say
        self.config = validate_config(dict(base), source="plan")
        self.task = get_task(self.config.task)
        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        self.device = pick_device(self.config.device)
        self.precision = resolve_precision(self.config.precision, self.device)
        self.meter = Meter(self.device)
        self.splits = self.task.load_splits(self.config)  # before the model, as a run: bad data fails first
        self.items: dict[str, list] = {}
        self.load_peak = 0
        self.after_load = 0
        self.met: set[tuple[int, int]] = set()  # batch shapes this process has trained on (all candidates)

    def config_for(self, cand: Candidate) -> TrainConfig:
        return validate_config(cand.apply(self.base), source=cand.label)

    def _load(self, config: TrainConfig) -> Any:
        """A fresh copy of the base model (the previous candidate's copy is dropped first)."""
        release()
        torch.manual_seed(config.seed)  # as run_training: the new head starts from the seed
        loaded = load_model(config.model, self.task, self.splits.labels, config)
        touch(loaded.model)
        if not self.items:  # the first load: what loading costs, and the run's encoded data
            self.items = {n: self.task.encode(loaded.tokenizer, getattr(self.splits, n), config.max_length)
                          for n in ("train", "validation", "test")}
            if not self.items["train"]:
                raise ValueError("the training split is empty after encoding; give more data or a larger max_length")
            self.load_peak = self.meter.peak()
            self.after_load = self.meter.current()
        return loaded

    def epoch(self, config: TrainConfig) -> tuple[list[list[int]], float]:
        """The run's batches of epoch 0 and their mean padded tokens."""
        train = self.items["train"]
        step_size = config.batch_size * config.gradient_accumulation  # examples per optimizer step, as fit()
        batches = epoch_batches([self.task.item_length(it) for it in train], step_size, config.seed, 0)
        return batches, sum(_tokens(train, b) for b in batches) / len(batches)

    def probe(self, cand: Candidate) -> dict[str, Any]:
        """One row: ``status`` ok with the predictions, or ``not applicable`` / ``error`` with why."""
        row: dict[str, Any] = {"label": cand.label, "method": cand.method, "choices": dict(cand.choices),
                               "status": "ok", "error": None}
        try:
            config = self.config_for(cand)
        except ValueError as err:
            return {**row, "status": "not applicable", "error": str(err)}
        row["lr"] = config.lr
        try:
            with dt.cpu_engine(config.cpu_engine):  # as run_training: the fused kernels' CPU products
                row.update(self._measure(config))
        except ValueError as err:  # the method does not fit this model (its target matched nothing, ...)
            return {**row, "status": "not applicable", "error": f"{type(err).__name__}: {err}"}
        except Exception as err:  # noqa: BLE001 - a failing candidate is a row, not the end of the plan
            traceback.print_exc()
            return {**row, "status": "error", "error": f"{type(err).__name__}: {err}"}
        finally:
            release()
        return row

    def _measure(self, config: TrainConfig) -> dict[str, Any]:
        loaded = self._load(config)
        release()
        start = self.meter.current()
        self.meter.reset()
        torch.manual_seed(config.seed)
        strategy = prepare_on(loaded, config, self.device)  # as run_training (runner.py)
        params = dt.parameter_report(loaded.model)
        train, task, tokenizer = self.items["train"], self.task, loaded.tokenizer
        run = training_runner(config, self.device, self.precision)  # the run's own runner
        collate = lambda idx: task.collate([train[i] for i in idx], tokenizer)  # noqa: E731
        batches, mean_tokens = self.epoch(config)
        with tempfile.TemporaryDirectory(prefix="deltatune-probe-") as tmp:
            s = _start(strategy, config, len(train), Path(tmp) / "checkpoint", False, Ranks())
            longest = sorted(range(len(train)), key=lambda i: task.item_length(train[i]))[-len(batches[0]):]
            s.model.train()
            c0 = time.process_time()
            _step(s, longest, collate, task.loss_weight, run, [])  # warm-up, and the largest activations of the run
            warm = {"wall": s.elapsed, "cpu": time.process_time() - c0, "tokens": _tokens(train, longest)}
            timed = self._timed(config, batches)
            timing = time_steps(s, timed, collate, task.loss_weight, run, lambda b: _tokens(train, b))
            steps_peak, before_eval = self.meter.peak(), self.meter.current()
            self.meter.reset()  # from here: the evaluation batch's and the save's own peak
            s.model.eval()
            held = self.items["validation"] or self.items["test"]
            if held:
                worst = sorted(held, key=task.item_length)[-config.eval_batch_size:]
                task.evaluate(s.model, worst, tokenizer, config.eval_batch_size, run)
            artifact = strategy.save(Path(tmp), tokenizer, training_meta(config, self.splits.labels),
                                     config.save_format)
            adapter_bytes = dir_bytes(artifact)
        steps_per_epoch = len(batches)
        shapes = self._shapes(config, [longest, *timed], timing["heap_growth"])
        memory = self._memory(start, steps_peak, before_eval, shapes)  # while the run's state is alive
        del s, strategy, loaded
        step = statistics.median(timing["rates"]) * mean_tokens
        first = first_step_extra(warm, timing)
        return {
            "trainable_parameters": params.trainable,
            "total_parameters": params.total,
            "trainable_share": params.trainable / params.total if params.total else None,
            "adapter_bytes": adapter_bytes,
            **memory,
            "step_seconds": step,
            "step_cpu_seconds": statistics.median(timing["cpu_rates"]) * mean_tokens,  # the step's work, load aside
            "cpu_share": timing["cpu_share"],
            "first_step_extra_seconds": first["wall"],  # the run's first step: one-off costs on top of a step
            "first_step_extra_cpu_seconds": first["cpu"],
            "steps_per_epoch": steps_per_epoch,
            "epoch_seconds": step * steps_per_epoch,
            "train_seconds": step * steps_per_epoch * config.epochs + first["wall"],
            "probe_rates": timing["rates"],
            "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        }

    def _timed(self, config: TrainConfig, batches: list[list[int]]) -> list[list[int]]:
        """The timed steps' batches: the first of the epoch's order, those with a shape no earlier
        candidate in this process met first, cycling if too few. Kernels are built once per shape and
        process, so only a shape new to the process shows what a new shape costs a run
        (:func:`shape_cost`). For the first candidate these are the epoch's first batches."""
        lengths = [self.task.item_length(it) for it in self.items["train"]]
        fresh = [b for b in batches if not batch_shapes(lengths, b, config.batch_size) <= self.met]
        pool = fresh + [b for b in batches if b not in fresh]
        return (pool * self.steps)[:self.steps]

    def _shapes(self, config: TrainConfig, probed: list[list[int]], growth: list[int | None]) -> dict[str, Any]:
        """What the batch shapes of the run will add beyond what the probe built (:func:`shape_cost`):
        ``probed`` the probe's steps (warm-up first), ``growth`` the timed steps' rise in in-use bytes.

        Only a shape new to the process builds kernels: those an earlier candidate met are in neither
        this candidate's baseline rise nor its timed steps' growth, yet a run (a fresh process) builds them."""
        train, micro = self.items["train"], config.batch_size
        lengths = [self.task.item_length(it) for it in train]
        before, seen, new = set(self.met), set(), []
        for i, batch in enumerate(probed):
            shapes = batch_shapes(lengths, batch, micro)
            if i:  # a timed step: how many shapes it met first in this process
                new.append(len(shapes - seen - before))
            seen |= shapes
        self.met |= seen
        built = seen - before  # shapes whose kernels this probe built: in what it measured as kept
        step_size = config.batch_size * config.gradient_accumulation
        run: set[tuple[int, int]] = set()
        step = last = 0  # the run's step that meets its last new shape: where its heap stops growing
        for epoch in range(config.epochs):  # every epoch's order differs; its shapes mostly repeat
            for batch in epoch_batches(lengths, step_size, config.seed, epoch):
                shapes, step = batch_shapes(lengths, batch, micro), step + 1
                last = step if not shapes <= run else last
                run |= shapes
        per_shape = shape_cost(growth, new)
        return {"per_shape": per_shape, "new": len(run - built), "bytes": per_shape * len(run - built),
                "growth_steps": last}

    def _memory(self, start: int, steps_peak: int, before_eval: int, shapes: dict[str, Any]) -> dict[str, Any]:
        """Predicted peak memory of the run from the probe's readings over ``start``:
        ``steps_peak`` (the peak over the steps), ``before_eval`` (resident after them), the meter's peak
        since (the evaluation batch and the save), what stays once freed memory is handed back, and
        ``shapes`` (:meth:`_shapes`)."""
        after_peak = self.meter.peak()
        release()  # what stays after the steps (optimizer state, gradients' storage, the adapter) is live memory
        kept = max(0, self.meter.current() - start)
        if self.meter.cuda:
            return {"peak_memory_mb": round(max(steps_peak, after_peak) / MiB, 1),
                    "memory_parts_mb": {"kept": round(kept / MiB, 1)}}
        parts = {"load_peak": self.load_peak, "after_load": self.after_load, "kept": kept,
                 "residue": max(0, before_eval - start - kept),  # freed by the steps, held by the heap
                 "shapes": shapes["bytes"],
                 "step_extra": max(0, steps_peak - before_eval),  # a step's transients above the heap
                 "eval_extra": max(0, after_peak - before_eval)}  # the evaluation batch's and the save's
        growth = heap_growth(shapes["growth_steps"])
        return {"peak_memory_mb": round(cpu_peak(parts, growth) / MiB, 1),
                "memory_parts_mb": {**{k: round(v / MiB, 1) for k, v in parts.items() if k != "load_peak"},
                                    "heap_growth": round(growth, 3), "growth_steps": shapes["growth_steps"],
                                    "new_shapes": shapes["new"],
                                    "per_shape": round(shapes["per_shape"] / MiB, 2)}}

    def facts(self) -> dict[str, Any]:
        """What every row shares: device, precision, data sizes, how memory was measured."""
        return {
            "device": str(self.device), "precision": self.precision, "torch_threads": torch.get_num_threads(),
            "splits": {"train": len(self.splits.train), "validation": len(self.splits.validation),
                       "test": len(self.splits.test)},
            "probe_steps": self.steps, "peak_memory_measure": self.meter.measure,
            "load_peak_mb": round(self.load_peak / MiB, 1), "after_load_mb": round(self.after_load / MiB, 1),
            "epochs": self.config.epochs, "batch_size": self.config.batch_size,
        }

