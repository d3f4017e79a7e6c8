"""Fused (IA)³ linear: ``l ⊙ (x Wᵀ + b)`` (output side) or ``(l ⊙ x) Wᵀ + b`` (input side).

Left to autograd, each form is the frozen layer plus one elementwise pass over an (N, d) tensor
in forward and two in backward (the scaled gradient, and the product reduced into l's gradient).
Here the vector is folded into the weight wherever that is the smaller tensor:

- input side: forward is one product with ``W diag(l)`` (the (N, d_in) scaled copy of x is never
  made); backward takes ``g W`` once, reduces it against x into l's gradient, then scales it in
  place into x's gradient;
- output side: forward keeps h = x Wᵀ + b (l's gradient is Σ_n g ⊙ h) and returns ``l ⊙ h``;
  backward is one product with ``diag(l) W`` (or ``(g ⊙ l) W`` for short batches);
- without gradients (inference) the same arithmetic runs without saving anything, so outputs
  are bit-identical whether or not the adapter trains;
- the products run on the chosen CPU engine (``deltatune.core.products.set_cpu_engine``).

It saves what autograd would (x, or h), except that an x its producer can rebuild (a GELU
output) is not kept twice (``core/saved.py``); only float32/bfloat16 linears
without autocast take this path (the adapter checks), everything else uses the formula.
"""

from __future__ import annotations

import torch
from torch import Tensor

from deltatune.methods.dora_kernels import _column_dot
from deltatune.core import saved
from deltatune.core.products import linear as _linear
from deltatune.core.products import mm as _mm


class _IA3Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, scale: Tensor,  # type: ignore[override]
                input_side: bool) -> Tensor:
        # x: (..., d_in); weight: (d_out, d_in), frozen; scale: (d_in,) input side, else (d_out,)
        if input_side:
            out = _linear(x, weight * scale, bias)           # (l ⊙ x) Wᵀ + b = x (W diag l)ᵀ + b
            kept, ctx.rebuild = saved.pack(x)                # x, or what its producer keeps (core/saved.py)
            ctx.save_for_backward(weight, scale, *kept)
        else:
            h = _linear(x, weight, bias)                     # (..., d_out)
            out = h * scale
            ctx.save_for_backward(weight, scale, h)
            ctx.rebuild = None
        ctx.input_side = input_side
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        weight, scale, *tensors = ctx.saved_tensors
        kept = saved.unpack(tuple(tensors), ctx.rebuild)     # x (input side) or h (output side)
        need_x, _, need_bias, need_scale, _ = ctx.needs_input_grad
        g = grad.reshape(-1, grad.shape[-1])                 # (N, d_out)
        grad_x = grad_bias = grad_scale = None
        if ctx.input_side:
            if need_bias:
                grad_bias = g.sum(0)
            if need_x or need_scale:
                gs = _mm(g, weight)                          # gradient of l ⊙ x, (N, d_in)
                if need_scale:
                    grad_scale = _column_dot(gs, kept.reshape(gs.shape))   # Σ_n (g W) ⊙ x
                if need_x:
                    grad_x = gs.mul_(scale).view(kept.shape)
        else:
            if need_scale:
                grad_scale = _column_dot(g, kept.reshape(g.shape))         # Σ_n g ⊙ h
            if need_bias:
                grad_bias = g.sum(0).mul_(scale)
            if need_x:
                d_in = weight.shape[1]
                gx = _mm(g, weight * scale[:, None]) if g.shape[0] > d_in else _mm(g * scale, weight)
                grad_x = gx.view(grad.shape[:-1] + (d_in,))
        return grad_x, None, grad_bias, grad_scale, None


def ia3_linear(x: Tensor, weight: Tensor, bias: Tensor | None, scale: Tensor, input_side: bool) -> Tensor:
    """``F.linear(x * scale, weight, bias)`` if ``input_side``, else ``F.linear(x, weight, bias) * scale``.

    ``weight`` (d_out, d_in) must not require a gradient; all tensors share x's dtype.
    """
    tracked = (x, scale) if bias is None else (x, scale, bias)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tracked):
        return _IA3Linear.apply(x, weight, bias, scale, input_side)
    if input_side:
        return _linear(x, weight * scale, bias)
    return _linear(x, weight, bias).mul_(scale)  # as in training, so outputs never depend on grad mode
