"""Scores and measurements: accuracy, macro-F1, peak memory."""

from __future__ import annotations

import resource
import sys

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


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """Peak memory in MiB and what the number means.

    On CUDA: the most memory torch's allocator held for tensors (``max_memory_allocated``). On CPU:
    the peak resident set size of this whole process (``ru_maxrss``): Python, libraries, model,
    data and activations together, since the CPU allocator keeps no separate count.
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "torch.cuda.max_memory_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    mib = rss / 2**20 if sys.platform == "darwin" else rss / 2**10
    return mib, "peak resident set size of the process (ru_maxrss)"
