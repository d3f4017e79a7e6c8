"""Scores and measurements: accuracy, macro-F1, peak memory."""

from __future__ import annotations

import resource
import statistics
import sys
from pathlib import Path

import torch


def accuracy(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Share of exact matches; ``pred`` and ``target`` are (N,) class indices."""
    return (pred == target).sum().item() / len(target) if len(target) else float("nan")


def macro_f1(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> float:
    """Unweighted mean over classes of F1 = 2·TP / (2·TP + FP + FN).

    A class that never occurs and is never predicted has no F1 and is left out of the mean (as
    scikit-learn does with ``labels`` restricted to the present ones); one that is predicted but
    absent, or present but never predicted, scores 0.
    """
    scores = []
    for c in range(num_classes):
        tp = ((pred == c) & (target == c)).sum().item()
        fp = ((pred == c) & (target != c)).sum().item()
        fn = ((pred != c) & (target == c)).sum().item()
        if tp + fp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores) if scores else float("nan")


def process_status_bytes(key: str) -> int:
    """A memory line of ``/proc/self/status`` (``VmRSS``, ``VmHWM``, ...) in bytes; OSError if there is none."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {key}")


def process_peak_bytes() -> tuple[int, str]:
    """This process's peak resident set size in bytes, and which counter gave it.

    Linux: ``VmHWM``, the high-water mark of this process's own address space. Not ``ru_maxrss``:
    the kernel carries that across ``execve`` from the process that launched this one, so a run
    started by a large parent (``compare``'s workers, ``tune``, a notebook's ``subprocess``) would
    report the parent's memory. Elsewhere ``ru_maxrss`` is all there is.
    """
    try:
        return process_status_bytes("VmHWM"), "peak resident set size of the process (VmHWM)"
    except (OSError, ValueError):
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return (rss if sys.platform == "darwin" else rss * 1024), "peak resident set size of the process (ru_maxrss)"


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """Peak memory in MiB and what the number means.

    On CUDA: the most memory torch's allocator held for tensors (``max_memory_allocated``). On CPU:
    the peak resident set size of this whole process (:func:`process_peak_bytes`): Python,
    libraries, model, data and activations together, since the CPU allocator keeps no separate count.
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "torch.cuda.max_memory_allocated"
    peak, what = process_peak_bytes()
    return peak / 2**20, what


def step_times(seconds: list[float]) -> dict[str, float] | None:
    """A run's per-step wall times in brief: the first step (it pays one-off costs: lazy kernel
    setup, first-touch page faults), the median, and the mean of the steps after the first."""
    if not seconds:
        return None
    rest = seconds[1:] or seconds
    return {"first": round(seconds[0], 4), "median": round(statistics.median(seconds), 4),
            "mean_after_first": round(sum(rest) / len(rest), 4)}
