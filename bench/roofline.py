"""Timing on a device and the small roofline of ``python -m bench.bf16``.

- ``matmul_precision``: float32 products in TF32 or IEEE float32 for a region;
- ``count_flops``: a step's matrix-multiply FLOPs (every product on torch's kernels, so each is counted);
- ``matmul_peak`` / ``peaks``: the measured ``F.linear`` rate over a model's own layer shapes, per
  dtype, the ceiling a step's achieved GFLOP/s is set against (on CUDA timed by events behind a
  sleep kernel, so only the GPU's time counts);
- ``time_rounds``: setups taking turns step by step, wall, CPU and (CUDA) event seconds, under a
  ``Clock`` budget.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@contextlib.contextmanager
def matmul_precision(precision: str) -> Any:
    """Float32 products in TF32 (``"tf32"``) or IEEE float32 (anything else), restored afterwards."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if precision == "tf32" else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def count_flops(step: Callable[[], Any]) -> int:
    """Matrix-multiply FLOPs of one step, every product on torch's kernels (so each is counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    from deltatune.core.products import cpu_engine

    with cpu_engine("aten"), FlopCounterMode(display=False) as counter:
        step()
    return int(counter.get_total_flops())


def linear_shapes(model: nn.Module) -> list[tuple[int, int]]:
    return sorted({(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)})


def _timed(fn: Callable[[], Any], iters: int, device: str) -> float:
    """Seconds per call of ``fn`` over ``iters`` back-to-back calls. On CUDA the calls are queued
    behind a sleep kernel and timed with events, so only the GPU's time for them counts."""
    if device != "cuda":
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) / iters
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    if hasattr(torch.cuda, "_sleep"):
        torch.cuda._sleep(10_000_000)  # about 5 ms of GPU cycles: the launches below queue up meanwhile
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def matmul_peak(shapes: list[tuple[int, int]], rows: int, dtype: str, device: str,
                reps: int = 3) -> dict[str, Any]:
    """GFLOP/s of ``F.linear`` (rows x d_in) x (d_out x d_in)ᵀ for each shape; best of ``reps`` each.
    ``dtype`` is ``"float32"``, ``"tf32"`` (float32 with TF32 products) or ``"bfloat16"``."""
    real = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    rates = {}
    with matmul_precision("tf32" if dtype == "tf32" else "fp32"):
        for d_in, d_out in shapes:
            product = functools.partial(F.linear, torch.randn(rows, d_in, device=device).to(real),
                                        torch.randn(d_out, d_in, device=device).to(real))
            one = _timed(product, 1, device)  # also the warm-up
            # on CUDA a burst of at least ~2 ms, so event resolution and the first launch do not matter
            iters = 1 if device != "cuda" else max(3, min(200, int(2e-3 / max(one, 1e-7))))
            best = min(_timed(product, iters, device) for _ in range(reps))
            rates[f"{rows}x{d_in}x{d_out}"] = 2 * rows * d_in * d_out / best / 1e9
    return {"gflops": max(rates.values()), "per_shape": rates}


def peaks(shapes: list[tuple[int, int]], rows: int, device: str) -> dict[str, dict[str, Any]]:
    dtypes = ["float32", "tf32", "bfloat16"] if device == "cuda" else ["float32", "bfloat16"]
    return {d: matmul_peak(shapes, rows, d, device) for d in dtypes}


class Clock:
    """Seconds since the bench started, against an optional budget."""

    def __init__(self, budget_s: float | None) -> None:
        self.t0, self.budget_s = time.perf_counter(), budget_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def over(self) -> bool:
        return self.budget_s is not None and self.elapsed() > self.budget_s


def time_rounds(steps: dict[str, Callable[[], Any]], rounds: int, per_round: int, device: str,
                clock: Clock, on_round: Callable[[dict[str, dict[str, list[float]]]], None]) -> dict[str, Any]:
    """Per-step wall, CPU (and on CUDA GPU-event) seconds of each setup, taking turns (order reversed
    every other round), ``per_round`` steps a turn; stops after two rounds once the budget is spent."""
    names = list(steps)
    times: dict[str, dict[str, list[float]]] = {n: {"wall": [], "cpu": [], "gpu": []} for n in names}
    cuda = device == "cuda"
    for r in range(rounds):
        if r >= 2 and clock.over():
            break
        for name in names if r % 2 == 0 else names[::-1]:
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                start.record()
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(per_round):
                steps[name]()
            if cuda:
                end.record()
                torch.cuda.synchronize()
                times[name]["gpu"].append(start.elapsed_time(end) / 1e3 / per_round)
            times[name]["wall"].append((time.perf_counter() - t0) / per_round)
            times[name]["cpu"].append((time.process_time() - c0) / per_round)
        on_round(times)
    return times
