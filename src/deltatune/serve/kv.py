"""The running batch's key/value cache: left-padded rows that join and leave between decode steps.

Every attention layer holds keys and values ``(B, H_kv, T, D)`` for the ``B`` running requests,
left-padded to a common length ``T``; ``mask: (B, T)`` marks the real positions (1) and the
padding (0), and each row's next position id is its count of real tokens. Joining stacks the new
rows under the old ones after padding the shorter side on the left; leaving keeps the remaining
rows and cuts the columns that are padding in every one of them. Between joins and leaves the
transformers ``DynamicCache`` grows by itself, one column per decode step.

Only the plain (full-attention) ``DynamicCache`` layout is handled; :func:`check_cache` refuses a
model whose cache is anything else (sliding windows, recurrent states) with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def _layers(cache: object) -> list:
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise RuntimeError("this transformers release's cache has no .layers; deltatune serve needs transformers >= 5.0")
    return layers


def check_cache(cache: object) -> None:
    """Refuse a cache whose layers are not plain growing key/value tensors."""
    from transformers.cache_utils import DynamicLayer

    for layer in _layers(cache):
        if type(layer) is not DynamicLayer:
            raise ValueError(f"deltatune serve batches plain key/value caches; this model's cache has a "
                             f"{type(layer).__name__} layer (sliding window or recurrent state), which it cannot pad")


def build(kv: list[tuple[Tensor, Tensor]]) -> object:
    """A ``DynamicCache`` holding these (keys, values) per layer, without copying them.

    (``DynamicCache(ddp_cache_data=kv)`` would copy every tensor once more, by concatenating it
    to an empty one: the whole cache, each time a row joins or leaves.) The layers are made from
    empty slices of the tensors, then handed the tensors themselves; the next decode step
    concatenates its column to them as usual.
    """
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache(ddp_cache_data=[(k[:, :, :0], v[:, :, :0]) for k, v in kv])
    for layer, (k, v) in zip(_layers(cache), kv):
        layer.keys, layer.values = k, v
    return cache


def tensors(cache: object) -> list[tuple[Tensor, Tensor]]:
    return [(layer.keys, layer.values) for layer in _layers(cache)]


def _pad_left(t: Tensor, n: int) -> Tensor:
    """``t: (B, H, T, D)`` with ``n`` zero columns in front: ``(B, H, n + T, D)``."""
    if n == 0:
        return t
    return torch.cat([t.new_zeros((*t.shape[:2], n, t.shape[3])), t], dim=2)


@dataclass
class Batch:
    """The running rows' cache and padding mask (``mask: (B, T)``, long)."""

    cache: object
    mask: Tensor

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    def join(self, other: Batch) -> Batch:
        """These rows, then ``other``'s, padded on the left to the longer of the two."""
        t_a, t_b = self.mask.shape[1], other.mask.shape[1]
        T = max(t_a, t_b)
        kv = []
        for (ka, va), (kb, vb) in zip(tensors(self.cache), tensors(other.cache)):
            kv.append((torch.cat([_pad_left(ka, T - t_a), _pad_left(kb, T - t_b)]),
                       torch.cat([_pad_left(va, T - t_a), _pad_left(vb, T - t_b)])))
        mask = torch.cat([torch.nn.functional.pad(self.mask, (T - t_a, 0)),
                          torch.nn.functional.pad(other.mask, (T - t_b, 0))])
        return Batch(build(kv), mask)

    def keep(self, rows: list[int]) -> Batch:
        """Only ``rows`` (in that order), without the columns that are padding in all of them."""
        idx = torch.tensor(rows, device=self.mask.device)
        mask = self.mask.index_select(0, idx)
        real = mask.any(dim=0).nonzero()
        start = int(real[0]) if len(real) else mask.shape[1]
        kv = [(k.index_select(0, idx)[:, :, start:], v.index_select(0, idx)[:, :, start:])
              for k, v in tensors(self.cache)]
        return Batch(build(kv), mask[:, start:])


def unpack(cache: object, lengths: list[int]) -> Batch:
    """A packed prefill's cache (one row: ``lengths[i]`` tokens of example ``i``, one after another)
    as a :class:`Batch` of left-padded rows, one per example: ``(1, H, N, D) -> (n, H, L, D)``."""
    n, N, L = len(lengths), sum(lengths), max(lengths)
    index, start = [], 0
    for k in lengths:  # each row: the zero column (N) as padding, then its own tokens
        index.append([N] * (L - k) + list(range(start, start + k)))
        start += k
    first = tensors(cache)[0][0]
    idx = torch.tensor(index, device=first.device)                                   # (n, L)
    kv = []
    for k, v in tensors(cache):  # (1, H, N, D) + a zero column -> (H, N + 1, D) -> (H, n, L, D) -> (n, H, L, D)
        kv.append(tuple(torch.cat([t[0], t.new_zeros((t.shape[1], 1, t.shape[3]))], 1)[:, idx].transpose(0, 1).contiguous()
                        for t in (k, v)))
    mask = torch.tensor([[0] * (L - k) + [1] * k for k in lengths], device=first.device)
    return Batch(build(kv), mask)
