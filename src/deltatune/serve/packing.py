"""Prefill without padding: the admitted prompts one after another in one packed row.

Left-padding a group of prompts to the longest one computes every layer on the padding too
(prompts of 8-24 tokens, 16 at once: ~30 % of the pass). Packed instead, the row holds exactly
the prompts' tokens: ``ids: (1, N)``, each prompt's own positions ``0..n_i - 1``, and a
block-diagonal causal mask ``(1, 1, N, N)`` so that a token sees only the earlier tokens of its own
prompt. The adapters are routed per run of tokens (``Router.route(names, lengths)``; prompts for
one adapter are put side by side, so each adapter is one run), the logits are taken at each
prompt's last token only (``logits_to_keep`` as positions), and the packed cache is cut into the
usual left-padded rows (:func:`deltatune.serve.kv.unpack`) that decode as before.

The price: attention over the packed row is ``N²`` rather than ``n·L²`` (a few per cent of the
pass for short prompts; :func:`worth` packs only up to ``MAX_TOKENS``), and the mask is a tensor.
So prompts are packed only when padding would waste at least ``MIN_WASTE`` of the padded tokens.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor, nn

MIN_WASTE = 0.1    # pack when padding would be at least this share of the padded tokens
MAX_TOKENS = 2048  # and the packed row at most this long (its mask is N x N)


def keeps_logits(model: nn.Module) -> bool:
    """Whether ``model.forward`` computes only the logits asked for (``logits_to_keep``)."""
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def supported(model: nn.Module) -> bool:
    """Whether ``model`` takes a packed row: a ready 4-D mask (eager or SDPA attention) and
    ``logits_to_keep`` positions (else every position's logits would be computed)."""
    attention = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return attention in ("eager", "sdpa") and keeps_logits(model)


def worth(lengths: list[int]) -> bool:
    n, longest, total = len(lengths), max(lengths), sum(lengths)
    return n > 1 and total <= MAX_TOKENS and n * longest - total >= MIN_WASTE * n * longest


def by_adapter(jobs: list[Any]) -> list[Any]:
    """The jobs with each adapter's side by side (one run of tokens per adapter), bare base first."""
    return sorted(jobs, key=lambda job: "" if job.adapter is None else "." + job.adapter)


def inputs(prompts: list[list[int]], dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``ids (1, N)``, the additive mask ``(1, 1, N, N)``, ``positions (1, N)`` and each prompt's
    last token ``(n,)`` for the prompts one after another.

    The index vectors are laid out on the host and moved in one copy: computed on a GPU, their
    sizes (``N``, ``repeat_interleave``'s output) would each wait for the device."""
    lengths = [len(p) for p in prompts]
    N = sum(lengths)
    ends, start = [], 0
    for n in lengths:
        start += n
        ends.append(start - 1)
    host = torch.tensor([[t for p in prompts for t in p],                         # ids
                         [i for i, n in enumerate(lengths) for _ in range(n)],   # prompt of each token
                         [k for n in lengths for k in range(n)],                 # positions 0..n_i - 1
                         ends + [0] * (N - len(ends))])                          # (4, N), ends padded
    ids, which, positions, last = host.to(device).unbind(0)
    order = torch.arange(N, device=device)
    seen = (which[:, None] == which[None, :]) & (order[:, None] >= order[None, :])              # (N, N) own prompt, causal
    mask = torch.zeros((N, N), dtype=dtype, device=device).masked_fill_(~seen, torch.finfo(dtype).min)
    return ids[None], mask[None, None], positions[None], last[: len(prompts)]


def padded(prompts: list[list[int]], pad: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """The prompts left-padded to the longest: ``ids``, ``mask`` and ``positions``, each ``(n, L)``."""
    L = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (L - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts], device=device)
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)
