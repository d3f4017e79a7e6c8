"""``frozen_dtype``: under bf16 precision, the frozen base's linear weights are used in bf16, copied once.

``frozen_dtype: bfloat16`` wraps the runner so every forward of a bf16 run (training
steps and validation alike: both go through the runner, under autocast) sees bf16 copies of the
frozen ``nn.Linear`` weights instead of making autocast cast them again each call
(:class:`deltatune.core.frozen_dtype.FrozenInDtype`: plain linear layers compute bit for bit what
they computed before; the float32 originals are back in place whenever the runner returns, so
saving, merging, generation and the test metrics see the base as loaded).
``frozen_dtype: float32`` (the default) leaves autocast to cast them every step: the copies sit beside
the float32 base (half the frozen linear weights' bytes more), and the quiet-window bench measured
LoRA steps no faster with them (0.99x on MiniLM, 1.03x on SmolLM2), so they are opt-in.

Not applied with gradient checkpointing (its recomputation in backward runs outside the runner),
under torchrun (DDP/FSDP own the parameters), or in float32 runs (nothing to save).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from deltatune.core.frozen_dtype import FrozenInDtype

Runner = Callable[[nn.Module, dict[str, torch.Tensor]], Any]


def applies(config: Any, precision: str, distributed: bool) -> bool:
    """Whether ``frozen_dtype`` puts the frozen linear weights in bf16 for this run."""
    return (getattr(config, "frozen_dtype", "float32") == "bfloat16" and precision == "bf16" and not distributed
            and not getattr(config, "gradient_checkpointing", False))


def frozen_runner(run: Runner, dtype: torch.dtype = torch.bfloat16) -> Runner:
    """``run`` with the model's frozen linear weights in ``dtype`` while it runs (copies made once)."""
    frozen = FrozenInDtype(dtype)

    def run_frozen(model: nn.Module, batch: dict[str, torch.Tensor]) -> Any:
        with frozen(getattr(model, "module", model)):
            return run(model, batch)

    run_frozen.frozen = frozen  # type: ignore[attr-defined]  # for tests and reports
    return run_frozen
