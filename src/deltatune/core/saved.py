"""Keep a kernel's input for backward without keeping a second copy of it.

An adapter kernel needs its input x in backward (for the gradient of its first factor), but the
frozen layer around it does not: without the adapter nobody would keep x. Often x is the fresh
output of an elementwise op that keeps its own inputs for backward anyway, e.g. a feed-forward
block's ``gelu(h)`` (GELU keeps h) or a gated MLP's ``silu(g) * u`` (the product keeps both
factors). Then the kernel saves those inputs instead, which costs no memory, and re-runs the op
in backward, which gives x back bit for bit. On all-MiniLM-L6-v2 that drops the feed-forward
down-projection's (N, 4d) input from what a low-rank adapter's training step keeps.

``pack(x)`` returns the tensors to hand to ``ctx.save_for_backward`` and how to rebuild x from
them (``None``: the tensors are just ``(x,)``); ``unpack`` rebuilds it. x is kept as it is when:

- it does not come from one of the ops below (or is a view of its output, or was modified in
  place: its ``grad_fn`` is then another node);
- the producer did not keep the inputs needed (they did not require gradients);
- saved-tensor hooks are active (``torch.utils.checkpoint``, offloading): those hooks own what is
  saved, and reading another node's saved tensors would trigger them;
- inside ``torch.compile``, which traces its own graph.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

Rebuild = Callable[..., Tensor]


def _gelu(node: Any) -> tuple[tuple[Tensor | None, ...], Rebuild]:
    approximate = node._saved_approximate
    return (node._saved_self,), lambda h: F.gelu(h, approximate=approximate)


def _silu(node: Any) -> tuple[tuple[Tensor | None, ...], Rebuild]:
    return (node._saved_self,), F.silu


def _mul(node: Any) -> tuple[tuple[Tensor | None, ...], Rebuild]:
    return (node._saved_self, node._saved_other), torch.mul


#: autograd node type name -> (the inputs it keeps, the op that recomputes its output exactly)
PRODUCERS: dict[str, Callable[[Any], tuple[tuple[Tensor | None, ...], Rebuild]]] = {
    "GeluBackward0": _gelu,
    "SiluBackward0": _silu,
    "MulBackward0": _mul,
}


def _hooks_active() -> bool:
    try:
        return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None
    except (AttributeError, RuntimeError, TypeError):  # unknown torch: be safe, keep x itself
        return True


def pack(x: Tensor) -> tuple[tuple[Tensor, ...], Rebuild | None]:
    """``(tensors, rebuild)``: save ``tensors``; in backward, ``unpack(tensors, rebuild)`` is x."""
    if torch.compiler.is_compiling() or not x.requires_grad or _hooks_active():
        return (x,), None
    node = x.grad_fn
    recipe = None if node is None else PRODUCERS.get(type(node).__name__)
    if recipe is None:
        return (x,), None
    try:
        inputs, rebuild = recipe(node)
    except (AttributeError, RuntimeError):  # saved tensors already freed, or a node of another shape
        return (x,), None
    if any(t is None or t.dtype != x.dtype or t.device != x.device for t in inputs):
        return (x,), None
    if any(t.numel() > x.numel() for t in inputs):  # broadcasting the other way: not a saving
        return (x,), None
    return tuple(t for t in inputs if t is not None), rebuild


def unpack(tensors: tuple[Tensor, ...], rebuild: Rebuild | None) -> Tensor:
    if rebuild is None:
        return tensors[0]
    with torch.autocast(tensors[0].device.type, enabled=False):  # the op ran on these dtypes already
        return rebuild(*tensors)
