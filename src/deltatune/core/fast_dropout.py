"""Dropout on the CPU with masks drawn as random bits: the same distribution, a fifth of the cost.

Torch's CPU dropout (``F.dropout``, and the math path of ``F.scaled_dot_product_attention`` that
attention dropout forces) fills a tensor of the input's dtype with ``bernoulli_``, divides it by
``1 - p`` in that dtype and keeps it for backward. Measured on this CPU that is 13 ms for a
(32, 40, 384) bf16 activation on one thread, most of it the float Bernoulli draw; the model's own
dropout was the largest single item of a bf16 adapter training step (18-27 %, README "Fast bf16 training").

:func:`dropout` draws the mask instead as random integers from torch's default generator
(``Tensor.random_`` on ``int64``: 63 random bits a word) and keeps an element when its integer is
below ``keep_threshold(p)``. For ``1/32 <= p <= 31/32`` (every usual rate) each word is cut into four
uniform 15-bit integers, one per element; outside that range into two 31-bit integers, so that a
rate like ``1e-6`` is not rounded away. Drawing the words is most of the cost, so the 15-bit mask
costs half the 31-bit one:

- **the same distribution**: every element is kept independently with probability
  ``keep_threshold(p) / 2**bits``, within ``2**-16`` of ``1 - p`` with 15 bits (a relative error of at
  most ``2**-11`` in ``p`` and in ``1 - p``, since both are at least ``1/32``; for ``p = 0.1``:
  0.100006), within ``2**-32`` with 31 bits;
- **exact scaling**: kept elements are multiplied by ``1 / (1 - p)`` as a Python float, applied in
  the op's float arithmetic (torch's CPU dropout rounds ``1 / (1 - p)`` to the input's dtype first:
  1.109375 instead of 1.1111 in bf16);
- **a compact mask**: backward keeps the mask as 0/1 bytes (1 byte an element, not 2-4; uint8,
  since products with a bool tensor take torch's unvectorised CPU path) and computes
  ``grad * mask * (1 / (1 - p))``;
- **the same random stream as a seed**: the bits come from the default CPU generator, so
  ``torch.manual_seed`` and the training checkpoint's saved RNG state reproduce the masks
  (a different stream from torch's own dropout, so runs differ from earlier ones by that noise);
- eval mode (``training=False``) and ``p == 0`` are the identity, as in torch.

:class:`FastDropout` is a ``TorchFunctionMode``: inside ``with FastDropout():`` every CPU call of
``F.dropout`` with ``training=True`` and every ``F.scaled_dot_product_attention`` with
``dropout_p > 0`` (the math path that torch takes then, written out as torch writes it, with the
mask drawn as above) takes this path; everything else runs untouched, and CUDA tensors keep
torch's own fused kernels. It works on any model without changing its modules or config.
Not for gradient checkpointing: the recomputation in backward runs outside the mode.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = ["FastDropout", "dropout", "keep_mask", "attention"]

_LOW31 = 0x7FFFFFFF7FFFFFFF  # the low 31 bits of each int32 half of an int64
_LOW15 = 0x7FFF7FFF7FFF7FFF  # the low 15 bits of each int16 quarter of an int64


def mask_bits(p: float) -> int:
    """Random bits per element for rate ``p``: 15 for ``1/32 <= p <= 31/32``, else 31 (module docstring)."""
    return 15 if 2**-5 <= p <= 1 - 2**-5 else 31


def keep_threshold(p: float, bits: int = 31) -> int:
    """``v < keep_threshold(p, bits)`` for ``v`` uniform on ``[0, 2**bits)`` has probability ``1 - p`` to
    within ``2**-(bits + 1)``."""
    return round((1.0 - p) * 2**bits)


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device | str = "cpu",
              generator: torch.Generator | None = None) -> Tensor:
    """A boolean tensor of ``shape``, each element True (kept) with probability ``1 - p`` (to 2**-16,
    or 2**-32 for a rate outside ``[1/32, 31/32]``; :func:`mask_bits`)."""
    n = math.prod(shape)
    bits = mask_bits(p)
    per_word, low, dtype = (4, _LOW15, torch.int16) if bits == 15 else (2, _LOW31, torch.int32)
    words = torch.empty(-(-n // per_word), dtype=torch.int64, device=device).random_(generator=generator)
    parts = words.bitwise_and_(low).view(dtype)  # per_word uniform integers of `bits` bits a word
    return (parts[:n] < keep_threshold(p, bits)).view(shape)


class _Dropout(torch.autograd.Function):
    # keep: the boolean mask viewed as uint8 (the same byte, 0 or 1): a product with a bool tensor runs
    # on torch's unvectorised CPU path, 4-8x slower than with uint8, and x·1, x·0 are exact either way.
    @staticmethod
    def forward(ctx: Any, x: Tensor, keep: Tensor, scale: float) -> Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x.mul(keep).mul_(scale)  # (x or 0), then times 1/(1-p) in the op's float arithmetic

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (keep,) = ctx.saved_tensors
        return grad.mul(keep).mul_(ctx.scale), None, None


def dropout(x: Tensor, p: float, training: bool = True, generator: torch.Generator | None = None) -> Tensor:
    """``F.dropout(x, p, training)`` with the mask drawn as random integers (module docstring)."""
    if not training or p == 0.0:
        return x
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if p == 1.0:
        return x.mul(0.0)
    keep = keep_mask(x.shape, p, x.device, generator).view(torch.uint8)  # 0/1 bytes, no copy (see _Dropout)
    return _Dropout.apply(x, keep, 1.0 / (1.0 - p))


def attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None, dropout_p: float = 0.0,
              is_causal: bool = False, scale: float | None = None) -> Tensor:
    """``F.scaled_dot_product_attention``'s math path (as torch's ``_scaled_dot_product_attention_math``
    computes it) with its attention dropout taken by :func:`dropout`. Shapes (..., L, E), (..., S, E),
    (..., S, Ev) -> (..., L, Ev)."""
    root = math.sqrt(scale if scale is not None else 1.0 / math.sqrt(query.shape[-1]))
    scores = (query * root) @ (key.transpose(-2, -1) * root)                    # (..., L, S)
    if is_causal:
        causal = torch.ones(query.shape[-2], key.shape[-2], dtype=torch.bool, device=query.device).tril()
        attn_mask = causal if attn_mask is None else attn_mask & causal
    empty_rows = False
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            # scores + (0 where allowed, -inf where not): what masked_fill_ gives, bit for bit (s + 0 = s,
            # s + -inf = -inf for finite s), as one vectorised add of the small broadcast mask; masked_fill
            # with a boolean mask runs on torch's slow CPU path
            bias = torch.zeros(attn_mask.shape, dtype=scores.dtype, device=scores.device)
            scores = scores.add_(bias.masked_fill_(~attn_mask, float("-inf")))
            empty_rows = bool((~attn_mask.any(-1)).any())  # on the (small) mask, not the (B, H, L, S) scores
        else:  # autocast casts a float mask to the product's dtype, as it does for torch's own call
            scores = scores + attn_mask.to(scores.dtype)
            empty_rows = True  # -inf in a float mask: only the scores tell
    # torch's math path takes _safe_softmax (a row with every key masked gives zeros, not NaN); with
    # no such row it equals the plain softmax, without a pass over the scores looking for one
    probs = torch.ops.aten._safe_softmax(scores, -1) if empty_rows else torch.softmax(scores, -1)
    return dropout(probs, dropout_p, True) @ value                              # (..., L, Ev)


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any) -> Any:
    return args[index] if len(args) > index else kwargs.get(name, default)


class FastDropout(TorchFunctionMode):
    """Inside ``with FastDropout():``, CPU dropout in training draws its masks as random bits."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.dropout:
            x, p = args[0], _arg(args, kwargs, 1, "p", 0.5)
            training, inplace = _arg(args, kwargs, 2, "training", True), _arg(args, kwargs, 3, "inplace", False)
            if training and not inplace and p > 0 and isinstance(x, Tensor) and x.device.type == "cpu":
                return dropout(x, p, True)
        elif func is F.scaled_dot_product_attention and len(args) >= 3:  # q, k, v by position, as callers pass them
            q, k, v = args[:3]
            p = _arg(args, kwargs, 4, "dropout_p", 0.0)
            plain = not kwargs.get("enable_gqa", False) and q.device.type == "cpu" and q.shape[:-2] == k.shape[:-2]
            mask, causal = _arg(args, kwargs, 3, "attn_mask", None), _arg(args, kwargs, 5, "is_causal", False)
            if p > 0 and plain and not (causal and mask is not None):  # both at once: torch's own error
                return attention(q, k, v, mask, p, causal, _arg(args, kwargs, 6, "scale", None))
        return func(*args, **kwargs)
