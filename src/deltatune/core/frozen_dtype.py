"""Frozen linear weights held once in the autocast dtype, swapped in while a forward runs.

Under ``torch.autocast(dtype=torch.bfloat16)`` every ``F.linear`` casts its float32 weight to
bfloat16 on every call: a full read and write of each frozen weight per step, and, because a frozen
weight gets no autocast cache entry, a fresh bf16 copy saved for backward in every layer. A frozen
weight never changes, so its bf16 copy can be made once.

:class:`FrozenInDtype` does that and nothing else: for the duration of a ``with`` block it puts a
bf16 copy (made on first use, remade only if the float32 weight was modified in place since: its
``_version`` counter moved) in place of the float32 weight of every frozen plain ``nn.Linear``
(its own ``forward``, no hooks, float32 weight and frozen bias), and puts the originals back in
``finally``. What that promises:

- **bit-identical results**: autocast would round those weights to bf16 for the product anyway
  (``Tensor.to`` rounds to nearest even either way), so a plain ``nn.Linear`` computes exactly what
  it computed before. Adapter kernels that read the frozen weight themselves see the bf16 values
  (a low-rank update's merged weight ``W + s·B A`` is then formed from bf16 W in float32 and rounded once more):
  different rounding, within bf16 tolerance (``tests/core/test_frozen_dtype.py``);
- **the base is never changed**: outside the block the module holds its original float32
  ``Parameter`` object (the same object, bit for bit), so ``merge``, ``save_adapter``, evaluation
  without autocast, generation and ``state_dict`` all see the float32 base. A merge can only
  happen outside a forward, so no update is ever rounded into a bf16 weight;
- **only inside autocast**: a bf16 weight meeting a float32 input without autocast is a dtype
  error, so enter the block only around a forward that runs under autocast of ``dtype``;
- gradients of everything that trains (adapters, heads, trained biases) are unaffected:
  only frozen tensors are swapped, and the optimizer never holds them.

Memory: the float32 originals stay (nothing else may need them: see above), so the resident model
grows by the bf16 copies (half the frozen linear weights); in exchange the per-step bf16 copies
that autocast saved for backward are gone, so the training peak does not grow.

Not for gradient checkpointing: its recomputation runs outside the block (in backward) and would
see float32 weights where the first forward saw bf16 ones.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["FrozenInDtype"]


def _eligible(module: nn.Module) -> bool:
    """A plain ``nn.Linear`` with a frozen float32 weight (and bias), no hooks."""
    if not isinstance(module, nn.Linear) or type(module).forward is not nn.Linear.forward:
        return False
    if module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks:
        return False
    weight, bias = module._parameters.get("weight"), module._parameters.get("bias")
    if type(weight) is not nn.Parameter or weight.dtype != torch.float32 or weight.requires_grad:
        return False
    return bias is None or (type(bias) is nn.Parameter and bias.dtype == torch.float32 and not bias.requires_grad)


class FrozenInDtype:
    """``with frozen(model): ...`` runs the block with frozen linear weights in ``dtype`` (made once).

    One instance per model; reusable and re-entrant (an inner ``with`` is a no-op).
    """

    def __init__(self, dtype: torch.dtype = torch.bfloat16) -> None:
        self.dtype = dtype
        # id(original Parameter) -> (original, its _version when copied, {name: copy})
        self._copies: dict[int, tuple[Tensor, int, nn.Parameter]] = {}
        self._depth = 0

    def _copy_of(self, p: nn.Parameter) -> nn.Parameter:
        hit = self._copies.get(id(p))
        if hit is None or hit[0] is not p or hit[1] != p._version:
            # Made outside inference mode even when first asked for there (an evaluation before
            # training): an inference tensor could not be saved for backward by a later step.
            with torch.inference_mode(False):
                copy = nn.Parameter(p.detach().to(self.dtype), requires_grad=False)
            hit = (p, p._version, copy)
            self._copies[id(p)] = hit
        return hit[2]

    def copies_bytes(self) -> int:
        """Bytes held by the copies made so far."""
        return sum(c.numel() * c.element_size() for _, _, c in self._copies.values())

    @contextlib.contextmanager
    def __call__(self, model: nn.Module) -> Iterator[int]:
        """Yields how many weights were swapped in."""
        if self._depth:
            self._depth += 1
            try:
                yield 0
            finally:
                self._depth -= 1
            return
        swapped: list[tuple[nn.Module, str, Any]] = []
        self._depth = 1
        try:
            for module in model.modules():
                if not _eligible(module):
                    continue
                for name in ("weight", "bias"):
                    p = module._parameters.get(name)
                    if p is not None:
                        module._parameters[name] = self._copy_of(p)
                        swapped.append((module, name, p))
            yield len(swapped)
        finally:
            for module, name, p in reversed(swapped):
                module._parameters[name] = p
            self._depth = 0
