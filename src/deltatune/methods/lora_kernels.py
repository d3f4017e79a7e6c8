"""Fused LoRA linear: ``y = x Wᵀ + b + s · (x_d Aᵀ) Bᵀ`` with a hand-written backward.

Why a custom autograd function: left to itself, autograd computes B's gradient as
``gradᵀ @ (x Aᵀ)``, an (d_out × N) @ (N × r) product that runs at the speed of a full-size matrix
product on CPU BLAS, and it keeps the intermediate ``B(A x)`` graph alive. Here

- the rank-r products are ordered so the long N dimension is the contracted one
  (``(xAᵀ)ᵀ @ grad``, ``(grad B)ᵀ @ x``);
- the low-rank term is accumulated into the base output in place (no (N, d_out) temporary);
- the scaling s is folded into the small (N, r) tensors, never into an (N, d_out) one;
- only ``x`` (shared with the base layer's own graph, not copied), the (N, r) projection, and
  the parameters are kept for backward; with dropout, the dropped input replaces ``x``.

The frozen weight gets no gradient; callers fall back to the plain formula when it requires one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, xd: Tensor, weight: Tensor, bias: Tensor | None,  # type: ignore[override]
                A: Tensor, B: Tensor, scaling: float) -> Tensor:
        # x, xd: (..., d_in); weight: (d_out, d_in); A: (r, d_in); B: (d_out, r)
        xa = (xd @ A.t()).mul_(scaling)                      # (..., r), already scaled
        out = F.linear(x, weight, bias)                      # (..., d_out)
        out2 = out.view(-1, out.shape[-1])
        out2.addmm_(xa.reshape(-1, xa.shape[-1]), B.t())     # += s·(x Aᵀ) Bᵀ, in place
        ctx.save_for_backward(xd, xa, weight, A, B)
        ctx.scaling = scaling
        ctx.same_input = xd is x
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        xd, xa, weight, A, B = ctx.saved_tensors
        s = ctx.scaling
        g = grad.reshape(-1, grad.shape[-1])                 # (N, d_out)
        x2 = xd.reshape(-1, xd.shape[-1])                    # (N, d_in)
        gb = (g @ B).mul_(s)                                 # (N, r), scaled once
        grad_x = grad_xd = grad_bias = grad_A = grad_B = None
        need_x, need_xd, _, need_bias, need_A, need_B, _ = ctx.needs_input_grad
        if need_x or need_xd:
            base_grad = g @ weight                           # (N, d_in)
            if ctx.same_input:
                base_grad.addmm_(gb, A)                      # + s·(g B) A
                grad_x = base_grad.view(xd.shape)
            else:
                grad_x = base_grad.view(grad.shape[:-1] + (weight.shape[1],))
                grad_xd = (gb @ A).view(xd.shape)
        if need_bias:
            grad_bias = g.sum(0)
        if need_A:
            grad_A = gb.t() @ x2                             # (r, N) @ (N, d_in)
        if need_B:
            grad_B = (xa.reshape(-1, xa.shape[-1]).t() @ g).t()  # ((r, N) @ (N, d_out))ᵀ
        return grad_x, grad_xd, None, grad_bias, grad_A, grad_B, None


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor,
                scaling: float, x_dropped: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias) + scaling · F.linear(F.linear(x_dropped, A), B)``, fused.

    ``weight`` must not require a gradient. ``x_dropped`` defaults to ``x`` (no dropout).
    """
    xd = x if x_dropped is None else x_dropped
    return _LoraLinear.apply(x, xd, weight, bias, A, B, scaling)
