"""LoftQ initialisation: quantize the base and initialise LoRA together, so that Q + s·B A ≈ W.

LoftQ (Li et al., ICLR 2024, arXiv:2310.08659). QLoRA starts from Q = quant(W) with B = 0, so the
adapted model starts off by the quantization error W − deq(Q). LoftQ alternates, from A = B = 0::

    Q      = quant(W − s·B A)                  # the base stores what the adapter does not carry
    B, A   = best rank-r factors of (W − deq(Q)) / s   (truncated SVD, √σ on each side)

and the model starts at deq(Q) + s·B A, much closer to W. ``iterations=1`` is one quantization and one
SVD; more alternate further. :func:`loftq` reports the relative approximation error
‖W − (deq(Q) + s·B A)‖_F / ‖W‖_F summed over the adapted layers before (plain quantization, B = 0)
and after.

The base it leaves is Q(W − s·B A), not quant(W): to reload the trained adapter, run :func:`loftq`
again on the same full-precision model and config (deterministic) and copy the adapter in, or save
the quantized base itself (``integrations.quantize.mark_for_transformers`` + ``save_pretrained``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from deltatune.core.inject import attach
from deltatune.core.records import adapted_layers
from deltatune.core.layer import AdaptedLayer
from deltatune.core.layers import quantized_format
from deltatune.integrations.quantize import DEFAULT_SKIP, quantized_linear


@dataclass(frozen=True)
class LoftqReport:
    """Relative Frobenius error of the initial model's weights against the full-precision ones,
    ``sqrt(Σ‖W − Ŵ‖²) / sqrt(Σ‖W‖²)`` over the adapted layers: ``before`` is plain quantization
    (QLoRA's start, B = 0), ``after`` LoftQ's deq(Q) + s·B A."""

    layers: int
    before: float
    after: float


def loftq(model: nn.Module, config: Any, fmt: str = "nf4", *, iterations: int = 1, name: str = "default",
          **quantize_kwargs: Any) -> LoftqReport:
    """Attach LoRA ``config`` to the full-precision ``model`` as ``name``, quantize the base to ``fmt``
    with LoftQ's initialisation (see the module docs), and quantize the other linear layers as
    :func:`~deltatune.integrations.quantize.quantize` would. Returns the approximation errors."""
    if getattr(config, "method", None) != "lora" or getattr(config, "init", "default") not in ("default", "gaussian"):
        raise ValueError("loftq initialises a plain LoRA adapter: pass a LoraConfig (init default), "
                         f"not {type(config).__name__}")
    if iterations < 1:
        raise ValueError(f"loftq iterations must be >= 1, got {iterations}")
    if any(isinstance(m, AdaptedLayer) for m in model.modules()) or any(
            quantized_format(m) is not None for m in model.modules()):
        raise ValueError("loftq needs the full-precision model with no adapter attached: it quantizes the base itself")
    qkw = {k: v for k, v in quantize_kwargs.items() if k != "skip"}
    attach(model, config, name)
    err_before = err_after = norm = 0.0
    count = 0
    for _, layer in list(adapted_layers(model)):
        adapter, base = layer.adapters[name], layer.base
        if type(base) is not nn.Linear:  # LoRA on an embedding or a convolution: left to plain quantization
            continue
        W = base.weight.detach().float()                        # (d_out, d_in)
        plain = _dequantized(quantized_linear(base, fmt, **qkw))
        A, B, Q = _alternate(base, W, adapter.rank, adapter.scaling, fmt, iterations, qkw)
        with torch.no_grad():
            adapter.A.copy_(A.to(adapter.A.dtype))
            adapter.B.copy_(B.to(adapter.B.dtype))
        err_before += (W - plain).pow(2).sum().item()
        err_after += (W - _dequantized(Q) - adapter.scaling * (B @ A)).pow(2).sum().item()
        norm += W.pow(2).sum().item()
        layer.base = Q
        count += 1
    _quantize_rest(model, fmt, quantize_kwargs)
    return LoftqReport(count, (err_before / max(norm, 1e-30)) ** 0.5, (err_after / max(norm, 1e-30)) ** 0.5)


def _alternate(base: nn.Linear, W: torch.Tensor, rank: int, scaling: float, fmt: str, iterations: int,
               kw: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, nn.Module]:
    A = W.new_zeros(rank, W.shape[1])   # (r, d_in)
    B = W.new_zeros(W.shape[0], rank)   # (d_out, r)
    Q: nn.Module | None = None
    for _ in range(iterations):
        target = nn.Linear(W.shape[1], W.shape[0], bias=base.bias is not None, device="meta")
        target.weight = nn.Parameter(W - scaling * (B @ A), requires_grad=False)
        target.bias = base.bias
        Q = quantized_linear(target, fmt, **kw)
        U, S, Vh = torch.linalg.svd((W - _dequantized(Q)) / scaling, full_matrices=False)
        root = S[:rank].sqrt()                                  # (r,)
        B, A = U[:, :rank] * root, root[:, None] * Vh[:rank]    # s·B A = best rank-r residual
    assert Q is not None
    return A, B, Q


def _dequantized(module: nn.Module) -> torch.Tensor:
    found = quantized_format(module)
    assert found is not None
    return found[0].dequantize(module).float()


def _quantize_rest(model: nn.Module, fmt: str, kw: dict[str, Any]) -> None:
    """Quantize every plain linear layer LoftQ did not (not the adapters' own, not the head)."""
    skip = tuple(kw.get("skip", DEFAULT_SKIP))
    for n, m in list(model.named_modules()):
        if type(m) is not nn.Linear or ".adapters." in n or any(n == s or n.endswith("." + s) for s in skip):
            continue
        parent, _, leaf = n.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, leaf, quantized_linear(m, fmt, **{k: v for k, v in kw.items() if k != "skip"}))


__all__ = ["LoftqReport", "loftq"]
