"""Fused DoRA linear: ``y = c ⊙ (x Wᵀ + b + s · (x_d Aᵀ) Bᵀ) + (1 − c) ⊙ b`` with a hand-written backward.

``c = m / ‖W + s·B A‖`` is DoRA's per-output scale (its norm already detached by the caller, so
autograd carries c's gradient on to the magnitude m). Built like :mod:`lora_kernels`, and for the
same reason: on CPU the cost of a layer beyond its two big matrix products is dominated by fresh
(N, d_out) temporaries, and autograd's composition of LoRA with the rescale makes three of them
in backward (``g ⊙ c``, ``g ⊙ u`` and a reduction) besides the output. Here

- for long batches without dropout (``lora_kernels.merge_pays``) u is one product with
  ``W' = W + s·B A`` and the input gradient one product with ``c ⊙ W'`` (formed again in backward,
  never stored); otherwise u is built in place as ``x Wᵀ + b`` plus the low-rank update (as in the
  LoRA kernel). The rescaled output is the only other (N, d_out) tensor; u is kept for c's gradient ``Σ_n g ⊙ (u − b)``, which is reduced in
  row blocks so no (N, d_out) temporary appears;
- the input gradient ``(g ⊙ c) W`` is computed as ``g (c ⊙ W)`` when there are more rows N than
  input features (scaling the weight is then cheaper than scaling the gradient), likewise for B;
- nothing saved is modified, so a graph can be backpropagated twice (``retain_graph``);
- every product goes through the chosen CPU engine (``deltatune.core.products``), so DoRA gets
  the same oneDNN speed-up and the same switch back to aten.

The frozen weight gets no gradient; callers fall back to the plain formula when it requires one.
"""

from __future__ import annotations

import torch
from torch import Tensor

from deltatune.core import saved
from deltatune.core.products import linear as _linear
from deltatune.core.products import mm as _mm
from deltatune.core.products import project_t as _project_t
from deltatune.core.products import thin_mm as _thin_mm
from deltatune.methods.lora_kernels import _merged_weight, merge_pays

_BLOCK = 256  # rows per block when reducing Σ_n g ⊙ u


def _column_dot(g: Tensor, u: Tensor) -> Tensor:
    """Σ_n g[n, :] ⊙ u[n, :] for (N, d) tensors, in row blocks (a (256, d) temporary at most).

    Accumulated in at least float32 (bf16 inputs under autocast: one rounding at the end), in g's dtype.
    """
    acc = torch.promote_types(g.dtype, torch.float32)
    out = torch.zeros(g.shape[1], dtype=acc, device=g.device)
    for i in range(0, g.shape[0], _BLOCK):
        out += (g[i:i + _BLOCK] * u[i:i + _BLOCK]).sum(0, dtype=acc)
    return out.to(g.dtype)


class _DoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, xd: Tensor, weight: Tensor, bias: Tensor | None,  # type: ignore[override]
                A: Tensor, B: Tensor, scaling: float, scale: Tensor) -> Tensor:
        # x, xd: (..., d_in); weight: (d_out, d_in); A: (r, d_in); B: (d_out, r); scale: (d_out,)
        x2 = xd.reshape(-1, xd.shape[-1])
        merged = xd is x and merge_pays(x2.shape[0], weight.shape[1], weight.shape[0])
        xa = _project_t(x2, A).t().mul_(scaling)             # (N, r), already scaled
        if merged:
            u = _linear(x, _merged_weight(weight, A, B, scaling).to(x.dtype), bias)  # x (W + s·B A)ᵀ + b
        else:
            u = _linear(x, weight, bias)                     # (..., d_out)
            u.view(-1, u.shape[-1]).addmm_(xa, B.t())        # += s·(x Aᵀ) Bᵀ
        out = u * scale if bias is None else torch.addcmul(bias * (1 - scale), u, scale)
        kept, ctx.rebuild = saved.pack(xd)  # xd, or the inputs its producer keeps (core/saved.py)
        ctx.save_for_backward(xa, weight, bias, A, B, scale, u, *kept)
        ctx.scaling = scaling
        ctx.same_input = xd is x
        ctx.merged = merged
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        xa, weight, bias, A, B, scale, u, *kept = ctx.saved_tensors
        xd = saved.unpack(tuple(kept), ctx.rebuild)
        s = ctx.scaling
        g = grad.reshape(-1, grad.shape[-1])                 # (N, d_out)
        x2 = xd.reshape(-1, xd.shape[-1])                    # (N, d_in)
        need_x, need_xd, _, need_bias, need_A, need_B, _, need_scale = ctx.needs_input_grad
        # The gradient reaching u is g ⊙ c: fold c into the smaller of g and W (always W when merged).
        if g.shape[0] <= weight.shape[1] and not ctx.merged:
            gc, w_c, B_c = g * scale, weight, B
        else:
            gc, w_c, B_c = g, None if ctx.merged else weight * scale[:, None], B * scale[:, None]
        gb_t = _project_t(gc, B_c.t()).mul_(s)               # (r, N) = s·(g c B)ᵀ, scaled once
        grad_x = grad_xd = grad_bias = grad_A = grad_B = grad_scale = None
        if (need_x or need_xd) and ctx.merged:               # g (c ⊙ (W + s·B A)): nothing to add
            grad_x = _mm(g, _merged_weight(weight, A, B, s).mul_(scale[:, None]).to(g.dtype)).view(xd.shape)
        elif need_x or need_xd:
            base_grad = _mm(gc, w_c)                         # (N, d_in)
            if ctx.same_input:
                base_grad.addmm_(gb_t.t(), A)                # + s·(g c B) A
                grad_x = base_grad.view(xd.shape)
            else:
                grad_x = base_grad.view(grad.shape[:-1] + (weight.shape[1],))
                grad_xd = (gb_t.t() @ A).view(xd.shape)
        if need_bias:
            grad_bias = g.sum(0)                             # y = c ⊙ (… + b) + (1 − c) ⊙ b
        if need_A:
            grad_A = _thin_mm(gb_t, x2)                      # (r, N) @ (N, d_in)
        if need_B:
            grad_B = _thin_mm(xa.t(), gc).t()                # ((r, N) @ (N, d_out))ᵀ
            if gc is g:
                grad_B = grad_B * scale[:, None]
        if need_scale:
            grad_scale = _column_dot(g, u.view(-1, u.shape[-1]))  # Σ_n g ⊙ u
            if bias is not None:
                grad_scale -= bias * g.sum(0)                # … − b Σ_n g
        return grad_x, grad_xd, None, grad_bias, grad_A, grad_B, None, grad_scale


def dora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scaling: float,
                scale: Tensor, x_dropped: Tensor | None = None) -> Tensor:
    """``scale ⊙ (F.linear(x, weight) + scaling · F.linear(F.linear(x_dropped, A), B)) + bias``, fused.

    ``weight`` must not require a gradient; ``scale`` (d_out,) may. ``x_dropped`` defaults to ``x``.
    """
    xd = x if x_dropped is None else x_dropped
    return _DoraLinear.apply(x, xd, weight, bias, A, B, scaling, scale)
