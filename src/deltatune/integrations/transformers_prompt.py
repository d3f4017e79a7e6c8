"""Virtual tokens at the input of a transformers model (prompt tuning and P-tuning).

A forward pre-hook on the model turns the call into one on ``inputs_embeds`` with N virtual token
embeddings in front::

    inputs_embeds = [P ; E(input_ids)],  P: (N, d) expanded over the batch -> (B, N + T, d)

and shifts what is indexed by token: the padding mask gains N ones, per-token labels N × -100 (no
loss on virtual tokens), token types N zeros, and positions run 0..N-1 over the virtual tokens and
continue at N for the real ones (caller-given ``position_ids`` p become p + N, so left padding in
``generate`` keeps working). The outputs keep the N virtual positions at the front, as Hugging Face
PEFT does (``logits[:, N:]`` are the real tokens').

During ``generate`` the virtual tokens are computed once, on the first call, and then live in the
KV cache; later calls only extend the mask and shift positions. The cache is tagged (see
``transformers_cache``) so a step can tell the two cases apart.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from deltatune.core.contract import VirtualTokens
from deltatune.core.parts import find_part
from deltatune.integrations.transformers_cache import check_fresh, put_cache, tag, tag_output, tags, take_cache
from deltatune.integrations.transformers_inputs import (
    bind_inputs,
    extend_mask,
    input_length,
    is_active,
    shift_positions,
    shift_token_inputs,
)


def prompt_hooks(model: nn.Module, layer: Any, name: str, method: str) -> list[Any]:
    """Hooks that prepend adapter ``name``'s virtual tokens (from ``virtual_tokens()``) on ``model``."""

    def before(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict] | None:
        if not is_active(layer, name, method):
            return None
        kw = bind_inputs(module, args, kwargs)
        adapter = find_part(layer, name, VirtualTokens)
        cache = take_cache(module, kw)
        put_cache(module, kw, cache)  # under the name this model takes (cache= or past_key_values=)
        if name in tags(cache):  # decoding: the virtual tokens are already in the cache
            n = tags(cache)[name][1]
            extend_mask(kw, n)
            shift_positions(kw, n, include_virtual=False)
            return (), kw
        check_fresh(cache, name, method)
        _, length = input_length(kw)
        embeds = kw.get("inputs_embeds")
        if embeds is None:
            embeds = layer(kw["input_ids"])                       # (B, T, d), through the adapted embedding
        virtual = adapter.virtual_tokens().to(embeds.dtype)       # (N, d)
        n = virtual.shape[0]
        virtual = virtual.unsqueeze(0).expand(embeds.shape[0], -1, -1)  # (B, N, d)
        kw["inputs_embeds"] = torch.cat([virtual, embeds], dim=1)       # (B, N + T, d)
        kw["input_ids"] = None
        extend_mask(kw, n)
        shift_positions(kw, n, include_virtual=True)
        shift_token_inputs(kw, n, length)
        if cache is not None:
            tag(cache, name, "prompt", n)
        return (), kw

    def after(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        if is_active(layer, name, method):
            tag_output(output, name, "prompt", find_part(layer, name, VirtualTokens).num_virtual_tokens)

    return [
        model.register_forward_pre_hook(before, with_kwargs=True),
        model.register_forward_hook(after, with_kwargs=True),
    ]
