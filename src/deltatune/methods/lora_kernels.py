"""Fused LoRA linear: ``y = x Wᵀ + b + s · (x_d Aᵀ) Bᵀ`` as one autograd function.

Why: left to autograd, the LoRA branch is three extra nodes with (N, d_out) temporaries, and B's
gradient comes out as ``gradᵀ @ (x Aᵀ)``, an (d_out × N) @ (N × r) product that CPU BLAS runs at
the speed of a full-size one. A frozen base needs only its input gradient ``g W``, so all a LoRA
layer should add to the base layer's two big products is four thin rank-r products (two passes
over x, two over g). Here:

- **merged product** for long batches (``merge_pays``: N above about the layer's width): the
  forward is a single product with ``W' = W + s·B A`` (formed in the weights' precision, never
  stored), and the input gradient is ``g W'``; nothing is accumulated into an (N, d) tensor;
- **low-rank update** for short ones (generation) and with dropout: ``y = x Wᵀ + b``, then
  ``y += s·(x_d Aᵀ) Bᵀ`` in place, and likewise for the input gradient: no (N, d) temporary;
- the rank-r products contract or produce the long N dimension in the orientation that runs
  fastest (``(x Aᵀ)ᵀ g`` and ``(g B)ᵀ x`` for the gradients, (r, N) projections); ``x Aᵀ`` is
  taken in forward while x is still in cache, and the products reading g come first in backward
  for the same reason;
- on CPU in float32 every large product runs on oneDNN by default (``core/products.py``): it
  streams these shapes up to twice as fast as the BLAS torch links (MKL takes slow code paths on
  AMD CPUs), so an adapted layer costs less than the frozen ``nn.Linear`` it wraps;
- the scaling s is folded into ``W'``, the update's ``alpha`` or the small (r, d) gradients, never
  applied to an (N, d) tensor;
- backward keeps x (or, when x is the fresh output of an op that keeps its own inputs, such as
  a feed-forward block's GELU, those inputs, and re-runs the op: ``core/saved.py``), the frozen
  weight, the factors and the (r, N) projection; with dropout, a boolean mask (1 byte per
  element) instead of a dropped copy of x (4 bytes), recomputed into x_d in backward;
- autocast: the products run in the autocast dtype, the rank-r gradient products read x in its
  own (usually float32) dtype, and every gradient is returned in its input's dtype.

A quantized frozen base (NF4: bitsandbytes, torchao) takes the same path with ``weight`` given as
a function that dequantizes it (``core/layers.py``: ``dequantized_weight_fn``): called in forward and
again in backward, as the libraries' own autograd functions do, so no dequantized copy is kept
between them; the fresh copy is where ``W' = W + s·B A`` is formed, in place.

Tried and measured slower on CPU, so not here: fusing ``g B`` into the big product as ``g [W' | B]``
(the wider output costs MKL more than the pass it saves; in bf16 on an AMD EPYC, with ``x Aᵀ`` taken
inside the forward product as ``x [W'; A]ᵀ`` too, the step was 2 % slower: docs/bf16.md) and processing
rows in cache-sized blocks (smaller products run less efficiently). The frozen weight never gets a gradient: callers use the
plain formula when it requires one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from deltatune.core import saved
from deltatune.core.products import linear as _linear
from deltatune.core.products import mm as _mm
from deltatune.core.products import project_t as _project_t
from deltatune.core.products import thin_mm as _thin_mm


def dropout_mask(x: Tensor, p: float) -> Tensor:
    """A boolean keep-mask for dropout with probability ``p`` (``x * mask / (1 - p)`` is dropout)."""
    return torch.empty_like(x, dtype=torch.bool).bernoulli_(1.0 - p)


def merge_pays(rows: int, d_in: int, d_out: int) -> bool:
    """Whether forming ``W' = W + s·B A`` costs less memory traffic than updating outputs in place.

    Forming W' (once in forward, once in backward) reads W and writes a fresh W': about
    ``6·d_in·d_out`` numbers moved; the low-rank updates read and write y in forward and the input
    gradient in backward: about ``2·N·(d_in + d_out)``. Measured on CPU the crossover sits there:
    MiniLM's batches (N = 4096, d = 384..1536) merge; SmolLM2's (N = 1024) merge the attention
    projections but not the 576↔1536 MLP ones; generation (N = 1) never does.
    """
    return rows * (d_in + d_out) > 3 * d_in * d_out


def _compute_dtype(x: Tensor) -> torch.dtype:
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def _merged_weight(weight: Tensor, A: Tensor, B: Tensor, scaling: float) -> Tensor:
    """``W + s·B A`` (d_out, d_in), in the weights' precision (at least that of W)."""
    dtype = torch.promote_types(weight.dtype, A.dtype)
    return torch.addmm(weight.to(dtype), B.to(dtype), A.to(dtype), alpha=scaling)


def _merged_in(weight: Tensor, A: Tensor, B: Tensor, scaling: float, dtype: torch.dtype,
               fresh: bool = False) -> Tensor:
    """``W + s·B A`` in the compute dtype ``dtype``.

    A weight already stored in a lower compute dtype (bf16 frozen weights under autocast,
    ``core/frozen_dtype.py``) gets the update in one product in that dtype (its accumulation in
    float32 inside the BLAS): one pass over W instead of a cast up, a float32 sum and a cast down.
    A ``fresh`` weight (just dequantized, nobody else's) in ``dtype`` gets it in place: the same
    numbers as ``addmm``, without a second (d_out, d_in) tensor.
    """
    if fresh and weight.dtype == dtype and torch.promote_types(dtype, A.dtype) == dtype:
        return weight.addmm_(B.to(dtype), A.to(dtype), alpha=scaling)
    if weight.dtype == dtype and dtype in (torch.bfloat16, torch.float16) and A.dtype != dtype:
        return torch.addmm(weight, B.to(dtype), A.to(dtype), alpha=scaling)
    return _merged_weight(weight, A, B, scaling).to(dtype)


def _dropped(x: Tensor, mask: Tensor | None, keep: float) -> Tensor:
    return x if mask is None else (x * mask).mul_(1.0 / keep)


def _forward(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scaling: float,
             mask: Tensor | None, keep: float, dtype: torch.dtype, merged: bool,
             keep_xa: bool = False, fresh: bool = False) -> tuple[Tensor, Tensor | None]:
    """The output (..., d_out) and (x_d Aᵀ)ᵀ (r, N), which B's gradient needs (None if not asked)."""
    xc = x.to(dtype)
    b = None if bias is None else bias.to(dtype)
    xa_t = None
    if keep_xa or not merged:
        # Taken first, while x is fresh in cache from the layer that produced it.
        xa_t = _project_t(_dropped(xc, mask, keep).reshape(-1, x.shape[-1]), A.to(dtype))  # (r, N)
    if merged:
        return _linear(xc, _merged_in(weight, A, B, scaling, dtype, fresh), b), xa_t
    out = _linear(xc, weight.to(dtype), b)                                       # (..., d_out)
    out.view(-1, out.shape[-1]).addmm_(xa_t.t(), B.to(dtype).t(), alpha=scaling)  # += s·(x_d Aᵀ) Bᵀ
    return out, xa_t


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | Callable[[], Tensor], bias: Tensor | None,  # type: ignore[override]
                A: Tensor, B: Tensor, scaling: float, mask: Tensor | None, keep: float, dtype: torch.dtype,
                merged: bool) -> Tensor:
        # x: (..., d_in); weight: (d_out, d_in), frozen, or a function dequantizing it; A: (r, d_in);
        # B: (d_out, r); mask like x
        fresh = callable(weight)
        with torch.autocast(x.device.type, enabled=False):
            w = weight() if fresh else weight
            out, xa = _forward(x, w, bias, A, B, scaling, mask, keep, dtype, merged, B.requires_grad, fresh)
        del w  # a dequantized copy is not kept for backward: it is dequantized again there
        kept, ctx.rebuild = saved.pack(x)  # x, or the inputs its producer keeps anyway (core/saved.py)
        ctx.save_for_backward(None if fresh else weight, A, B, xa, mask, *kept)
        ctx.weight_fn = weight if fresh else None
        ctx.scaling, ctx.keep, ctx.dtype, ctx.merged = scaling, keep, dtype, merged
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        weight, A, B, xa, mask, *kept = ctx.saved_tensors
        x = saved.unpack(tuple(kept), ctx.rebuild)
        need_x, _, need_bias, need_A, need_B = ctx.needs_input_grad[:5]
        fresh = ctx.weight_fn is not None
        with torch.autocast(grad.device.type, enabled=False):
            if fresh:  # only the input gradient reads W
                weight = ctx.weight_fn() if need_x else None
            grad_x, grad_A, grad_B = _backward(grad, x, weight, A, B, xa, mask, ctx.scaling, ctx.keep, ctx.dtype,
                                               ctx.merged, need_x, need_A, need_B, fresh)
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if need_bias else None
        return grad_x, None, grad_bias, grad_A, grad_B, None, None, None, None, None


def _backward(grad: Tensor, x: Tensor, weight: Tensor | None, A: Tensor, B: Tensor, xa_t: Tensor | None,
              mask: Tensor | None, s: float, keep: float, dtype: torch.dtype, merged: bool,
              need_x: bool, need_A: bool, need_B: bool,
              fresh: bool = False) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    d_in = x.shape[-1]
    g = grad.to(dtype).reshape(-1, grad.shape[-1])        # (N, d_out)
    # x is read in its own dtype: under autocast it is often float32, and casting it would be a
    # full extra pass; the rank-r products then also accumulate in the better precision.
    x2 = x.reshape(-1, d_in)                              # (N, d_in)
    m2 = None if mask is None else mask.reshape(-1, d_in)
    Ac, Bc = A.to(dtype), B.to(dtype)
    # Rank-r products are taken as (r, N) results (BLAS's fast path for them), and those that read
    # g come first, while g is fresh in cache from the layer above.
    gb_t = _project_t(g, Bc.t()) if (need_A or (need_x and not merged)) else None  # (r, N) = (g B)ᵀ
    grad_x = grad_A = grad_B = None
    if need_B:
        xa_t = _project_t(x2, A.to(x2.dtype)) if xa_t is None else xa_t     # (r, N) = (x Aᵀ)ᵀ
        grad_B = _thin_mm(xa_t.to(dtype), g).mul_(s).t().to(B.dtype)      # ((r, N) @ (N, d_out))ᵀ
    if need_x:
        assert weight is not None
        if merged:
            grad_x = _mm(g, _merged_in(weight, A, B, s, dtype, fresh))         # g (W + s·B A)
        else:
            grad_x = _mm(g, weight.to(dtype))                                 # (N, d_in)
            if m2 is None:
                grad_x.addmm_(gb_t.t(), Ac, alpha=s)                          # + s·(g B) A
            else:                                                             # dropout: · mask / keep
                grad_x.add_((gb_t.t() @ Ac).mul_(m2), alpha=s / keep)
        grad_x = grad_x.view(x.shape).to(x.dtype)
    if need_A:
        xd = _dropped(x2, m2, keep)
        grad_A = _thin_mm(gb_t.to(xd.dtype), xd).mul_(s).to(A.dtype)     # (r, N) @ (N, d_in)
    return grad_x, grad_A, grad_B


def lora_linear(x: Tensor, weight: Tensor | Callable[[], Tensor], bias: Tensor | None, A: Tensor, B: Tensor,
                scaling: float, mask: Tensor | None = None, keep: float = 1.0) -> Tensor:
    """``F.linear(x, weight, bias) + scaling · F.linear(F.linear(x * mask / keep, A), B)``, fused.

    ``weight`` (d_out, d_in; a transposed view is fine) must not require a gradient; or a function
    returning a new (d_out, d_in) tensor on each call (a quantized base's dequantized weight in the
    compute dtype), called once in forward and once more in backward if x needs a gradient.
    ``mask`` is a boolean keep-mask shaped like x (see :func:`dropout_mask`), ``None`` for no dropout.
    """
    dtype = _compute_dtype(x)
    rows = x.numel() // max(1, x.shape[-1])
    merged = mask is None and merge_pays(rows, A.shape[1], B.shape[0])
    tracked = (x, bias, A, B) if bias is not None else (x, A, B)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tracked):
        return _LoraLinear.apply(x, weight, bias, A, B, scaling, mask, keep, dtype, merged)
    fresh = callable(weight)
    with torch.autocast(x.device.type, enabled=False):
        w = weight() if fresh else weight
        return _forward(x, w, bias, A, B, scaling, mask, keep, dtype, merged, fresh=fresh)[0]
