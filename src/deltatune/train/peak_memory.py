"""A training run's peak memory: the meter the probe reads, and the CPU model that turns the
probe's readings into a whole run's peak (the parts and why: ``train/probe.py``'s notes).

On CUDA the allocator's own peak is the answer. On CPU a run's resident set is built of parts each
read from a short probe: what stays, the heap the steps freed but glibc kept (grown over a run by
:func:`heap_growth`), what each new batch shape leaves allocated for good (:func:`shape_cost` over
:func:`batch_shapes`, read with glibc's ``mallinfo2``: :func:`heap_in_use`) and one step's or the
evaluation's transients on top (:func:`cpu_peak`).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import math
import statistics
from collections.abc import Callable
from pathlib import Path

import torch

from deltatune.train.metrics import process_peak_bytes, process_status_bytes

__all__ = ["MiB", "Meter", "batch_shapes", "cpu_peak", "heap_growth", "heap_in_use", "release", "shape_cost"]

MiB = 2**20


def heap_growth(steps: int) -> float:
    """How many times the heap one probe step leaves freed but resident a CPU run holds once it has
    met all its batch shapes, ``steps`` optimizer steps in. glibc's heap: a batch longer than those
    before frees tensors whose holes later, differently sized tensors do not fit, so the heap grows
    while new lengths come and levels off once they stop (a 90-step MiniLM LoRA run on the AMD EPYC
    of 2026-12-04 met its last new length at step 30 and held 1,240 MiB then, 1,230 at step 80).
    Fitted to all-MiniLM-L6-v2 LoRA runs on an Intel Xeon (bf16, batches of 32 tweets): 1.08x after 15
    steps, 1.65x after 30, 2.24x after 90 (counted then as all the run's steps; those runs' growth
    also held the per-shape caches :func:`shape_cost` now counts on their own). On the AMD EPYC, with
    those apart, four MiniLM runs of 30 steps held 1.49-1.84x the probe's freed heap (this gives 1.64x)."""
    return 1 + 1.3 * (1 - math.exp(-max(0, steps - 13) / 25))


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _libc_mallinfo2() -> Callable[[], _MallInfo2] | None:
    try:
        fn = ctypes.CDLL("libc.so.6").mallinfo2  # glibc >= 2.33
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    return fn


_MALLINFO2 = _libc_mallinfo2()


def heap_in_use() -> int | None:
    """Bytes malloc has handed out and not had back (glibc's ``mallinfo2``: heap chunks in use plus
    mapped ones), or None where there is no glibc. Unlike the resident set it does not count freed
    memory the heap keeps, so its rise over a step is what that step left allocated for good."""
    if _MALLINFO2 is None:
        return None
    info = _MALLINFO2()
    return info.uordblks + info.hblkhd


def batch_shapes(lengths: list[int], batch: list[int], micro: int) -> set[tuple[int, int]]:
    """The shapes one optimizer step's micro-batches of at most ``micro`` examples give the model:
    (examples, longest example), as ``data.pad`` pads a batch to its longest."""
    return {(len(part), max(lengths[i] for i in part)) for part in
            (batch[j:j + micro] for j in range(0, len(batch), micro))}


def shape_cost(growth: list[int | None], new: list[int]) -> float:
    """Bytes a batch shape the process has not met before leaves allocated for good: the median, over
    the timed steps that met new shapes, of the step's rise in malloc's in-use bytes per new shape.

    torch and oneDNN build kernels, primitives and their scratch per shape and keep them (measured on
    all-MiniLM-L6-v2, bf16: 5.5-11 MiB per new padded length depending on the method, 0 for a step
    whose length was seen before; SmolLM2-135M: 14-16 MiB). A run meets a new length in most of its
    first steps, so its resident set rises by this much each time, whatever its transients. 0 where
    no timed step met a new shape or malloc's figures are not available (``growth`` None)."""
    per = [g / n for g, n in zip(growth, new) if n and g is not None]
    return max(0.0, statistics.median(per)) if per else 0.0


def cpu_peak(parts: dict[str, float], growth: float) -> float:
    """A CPU run's predicted peak resident set from the probe's parts (bytes; see the module's notes):
    ``after_load + kept + growth x residue + shapes + max(step_extra, eval_extra)``, at least the peak
    of loading."""
    heap = parts["after_load"] + parts["kept"] + growth * parts["residue"] + parts["shapes"]
    return max(parts["load_peak"], heap + max(parts["step_extra"], parts["eval_extra"]))


class Meter:
    """Peak memory in bytes, resettable: the CUDA allocator's, or the process's resident set on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.resettable = self.cuda or self._clear_refs()
        self.measure = ("torch.cuda.max_memory_allocated" if self.cuda
                        else "peak resident set size of the process (VmHWM, reset per candidate)")

    def _clear_refs(self) -> bool:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS (Linux >= 4.0)
            process_status_bytes("VmHWM")
            return True
        except OSError:
            return False

    def current(self) -> int:
        if self.cuda:
            return torch.cuda.memory_allocated(self.device)
        try:
            return process_status_bytes("VmRSS")
        except OSError:
            return 0

    def peak(self) -> int:
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device)
        return process_peak_bytes()[0]  # not Linux: ru_maxrss never resets; the first candidate's peak is the floor

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.resettable:
            self._clear_refs()


def release() -> None:
    """Free what Python and torch hold and hand freed heap back to the system (glibc's malloc_trim)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
