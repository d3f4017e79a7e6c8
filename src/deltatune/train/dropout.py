"""``dropout_kernel``: how a training run draws the model's own dropout masks on the CPU.

``fast`` (the default) wraps the runner so that every training forward on the CPU runs inside
:class:`deltatune.core.fast_dropout.FastDropout`: the model's ``nn.Dropout`` layers and the
attention dropout of ``F.scaled_dot_product_attention`` draw their masks as 15-bit random
integers (31-bit for a rate below 1/32) from torch's generator instead of float ``bernoulli_``
(the same keep probability to within 2**-16, exact ``1 / (1 - p)`` scaling, a one-byte mask kept
for backward; a fraction of the cost). Torch
takes its math attention path whenever attention dropout is on, and so does the fast path, with
the cheaper mask. ``torch`` keeps torch's own dropout (the random stream of runs before this
option existed). Evaluation (``model.eval()``) is untouched either way: dropout is the identity there. A model
without dropout (SmolLM2) runs without the mode too: a ``TorchFunctionMode`` costs a few
microseconds on every torch call of the forward (about 1 % of a MiniLM step).

Not applied with gradient checkpointing (its recomputation in backward runs outside the runner
and would draw other masks than the forward did), nor on CUDA (torch's fused dropout is fast there).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.modules.dropout import _DropoutNd

from deltatune.core.fast_dropout import FastDropout

Runner = Callable[[nn.Module, dict[str, torch.Tensor]], Any]


def applies(config: Any, device: torch.device) -> bool:
    """Whether ``dropout_kernel: fast`` takes the model's dropout in this run's training forwards."""
    return (getattr(config, "dropout_kernel", "torch") == "fast" and device.type == "cpu"
            and not getattr(config, "gradient_checkpointing", False))


def fast_dropout_runner(run: Runner) -> Runner:
    """``run`` with its training forwards inside :class:`FastDropout` (eval forwards as they were)."""

    def run_fast(model: nn.Module, batch: dict[str, torch.Tensor]) -> Any:
        if not model.training or not has_dropout(model):  # nothing to draw: no mode and its per-call cost
            return run(model, batch)
        with FastDropout():
            return run(model, batch)

    return run_fast


def has_dropout(model: nn.Module) -> bool:
    """Whether a training forward of ``model`` may draw dropout: a dropout module with ``p > 0``, or a
    transformers config whose ``attention_dropout`` (passed to SDPA, no module) is above 0."""
    if any(isinstance(m, _DropoutNd) and m.p > 0 for m in model.modules()):
        return True
    config = getattr(getattr(model, "module", model), "config", None)
    rate = getattr(config, "attention_dropout", 0.0)
    return isinstance(rate, (int, float)) and rate > 0
