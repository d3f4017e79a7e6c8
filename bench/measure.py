"""Measuring tools: a training step, interleaved timing, two kinds of peak memory, and writing results.

Time: every setup lives in the same process and the setups take turns, one step each per round
(ABC, then CBA, ...), so load changes on a shared machine hit them all alike; medians over rounds.

Memory, two independent figures:

- **tensor peak** (the headline): a ``TorchDispatchMode`` sees every tensor an operator returns,
  forward, backward and optimizer alike; it adds a storage's bytes when the storage first appears
  and subtracts them when the storage is freed (a weak-reference finaliser on the storage). Its
  peak over the first two training steps from a fresh optimizer (the second one holds the
  optimizer state) is the memory a training step adds on top of the loaded model: gradients,
  optimizer state, saved activations and temporaries. Like ``torch.cuda.max_memory_allocated``
  it is exact and repeatable, but it does not see allocator slack or scratch space inside kernels.
- **RSS growth**: the operating system's view, from a fresh process per setup: ``VmHWM`` (peak
  resident set) after two steps minus ``VmRSS`` once the model, batch and optimizer are built,
  with the peak reset just before the steps (``/proc/self/clear_refs``) and freed heap returned
  first (``malloc_trim``). It includes allocator overhead, so it is noisier.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import statistics
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


#: ``--bf16``: run every training forward under ``torch.autocast(dtype=torch.bfloat16)``.
AUTOCAST: torch.dtype | None = None


def train_step(model: torch.nn.Module, batch: dict[str, torch.Tensor], opt: torch.optim.Optimizer) -> float:
    """One optimizer step on ``batch``; gradients are freed afterwards (``set_to_none``)."""
    device = batch["input_ids"].device.type
    with torch.autocast(device, dtype=AUTOCAST or torch.bfloat16, enabled=AUTOCAST is not None):
        loss = model(**batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int, warmup: int = 1,
                device: str = "cpu") -> dict[str, dict[str, list[float]]]:
    """Seconds per call of each function, taking turns (order reversed every other round).

    Returns wall-clock and process CPU seconds per call. On a shared machine CPU time is the
    steadier of the two (it does not count time spent waiting for a core); wall time is what a
    user waits for, and what the goals use.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, dict[str, list[float]]] = {n: {"wall": [], "cpu": []} for n in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            fns[name]()
            sync(device)
            times[name]["wall"].append(time.perf_counter() - t0)
            times[name]["cpu"].append(time.process_time() - c0)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


class TensorPeak(TorchDispatchMode):
    """Live bytes of every storage created while active, and their peak (see module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._live: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # Views, in-place and out= results share an input's storage: nothing was allocated. (This
        # also keeps storages that existed before tracking, such as the weights, out of the count.)
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                if storage._cdata not in inputs:
                    self._track(storage)
        return out

    def _track(self, storage: torch.UntypedStorage) -> None:
        key = storage._cdata  # the C++ storage's address: unique while it is alive
        if key in self._live:
            return
        nbytes = storage.nbytes()
        self._live[key] = nbytes
        self.current += nbytes
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key).atexit = False

    def _free(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)


def tensor_peak(step: Callable[[], Any], steps: int = 2) -> dict[str, int]:
    """Peak and final live tensor bytes created by ``steps`` calls of ``step``.

    Tensors die by reference counting; no ``gc.collect`` is needed (and it costs a quarter second
    with transformers loaded).
    """
    with TensorPeak() as tracker:
        for _ in range(steps):
            step()
    return {"peak": tracker.peak, "after": tracker.current}


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_growth(step: Callable[[], Any], steps: int = 2) -> dict[str, Any]:
    """Peak resident-set growth over ``steps`` calls (Linux), with how the peak was reset."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    baseline = _status("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        reset = True
    except OSError:
        reset = False
    for _ in range(steps):
        step()
    peak = _status("VmHWM")
    return {"rss_peak_growth": peak - baseline, "hwm_reset": reset, "baseline": baseline}


def cuda_peak(step: Callable[[], Any], steps: int = 2) -> dict[str, int]:
    """The same figure as :func:`tensor_peak` from CUDA's allocator statistics."""
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return {"peak": torch.cuda.max_memory_allocated() - start, "after": torch.cuda.memory_allocated() - start}


def write_json(out: Path, record: dict[str, Any], indent: int | None = 1) -> None:
    """``record`` to ``out`` atomically (a temporary file beside it, then renamed over it), so a
    bench rewriting its results as it goes never leaves a torn file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=indent) + "\n")
    os.replace(tmp, out)
