"""The transformers KV-cache plumbing behind prefix tuning (and the cache bookkeeping of prompt tuning).

Prefix tuning gives every attention layer N extra key/value positions. transformers models already
accept extra key/value positions: the KV cache. So the prefix enters as a
``DynamicCache`` pre-filled with the N prefix keys and values of every layer, exactly where a
cached past would be, and the model needs no change:

    layer i attends over [P_k^i ; K^i]  and  [P_v^i ; V^i],  P^i: (B, H_kv, N, D)

with the padding mask extended by N ones and the real tokens at positions N, N+1, ... (as if the
prefix had been N real tokens before them). During ``generate`` the prefix is put in the cache on
the first call and stays there for every decoding step.

Everything that depends on transformers' cache classes lives here, and
``tests/integrations/test_transformers_cache.py`` pins the behaviour: if a transformers release
changes how caches are built, filled or read, those tests fail rather than the prefix being
silently ignored. At run time two guards remain: training with activation checkpointing (which
makes transformers drop the cache) is refused before the forward, and after every forward each
layer's cache must be as long as the padding mask the model was given (prefix + past + current
tokens); otherwise the model ignored the prefix and ``RuntimeError`` says so.

Two forward APIs exist: transformers <= 5.23 takes the cache as ``past_key_values=``; 5.24 renamed
it ``cache=`` (and the output field with it), keeping the old name as a deprecated alias until 5.40.
:func:`cache_keyword` reads which one a model takes from its forward signature, once per forward
function (not from a version string, so remote-code models and backports are judged by what they
accept). The hooks accept either name from the caller and pass the cache on under the model's own.

Caches are tagged with the virtual tokens they hold (attribute ``_deltatune_virtual``: adapter
name -> (kind, N)), so a decoding step knows the virtual tokens are already in the cache, and a
cache computed without an adapter is refused rather than mixed with it.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from deltatune.core.contract import KeyValuePrefix
from deltatune.core.parts import find_part
from deltatune.integrations.transformers_inputs import (
    bind_inputs,
    extend_mask,
    input_length,
    is_active,
    shift_positions,
    text_config,
)

_TAG = "_deltatune_virtual"
_CACHE_NAMES = ("cache", "past_key_values")
_KEYWORD: dict[Any, str] = {}


# --- which keyword carries the cache -------------------------------------------------------------

def cache_keyword(model: nn.Module) -> str:
    """The keyword ``model.forward`` takes the KV cache under: ``"cache"`` (transformers >= 5.24) or
    ``"past_key_values"`` (older releases).

    A head model whose forward names neither (``BertForSequenceClassification.forward(..., **kwargs)``
    hands its keywords to the backbone) is judged by its backbone, ``model.base_model``; a forward
    with neither name and no backbone (remote code) gets the old name, which every release accepts.
    """
    forward = model.forward
    key = getattr(forward, "__func__", forward)  # one look per forward function, not per call
    found = _KEYWORD.get(key)
    if found is None:
        found = _KEYWORD[key] = _read_keyword(model, forward)
    return found


def _read_keyword(model: nn.Module, forward: Any) -> str:
    try:
        params = inspect.signature(forward).parameters  # follows functools.wraps to the real signature
    except (TypeError, ValueError):
        params = {}
    for name in _CACHE_NAMES:
        if name in params:
            return name
    backbone = getattr(model, "base_model", None)
    if isinstance(backbone, nn.Module) and backbone is not model:
        return cache_keyword(backbone)
    return "past_key_values"


def take_cache(model: nn.Module, kw: dict[str, Any]) -> Any:
    """Remove the cache from the call's keywords, under either name; ``None`` if there is none."""
    given = {k: kw.pop(k) for k in _CACHE_NAMES if kw.get(k) is not None}
    for k in _CACHE_NAMES:
        kw.pop(k, None)
    if len(given) > 1:
        raise ValueError(f"{type(model).__name__} got both cache= and past_key_values=: pass the KV cache once, as "
                         f"{cache_keyword(model)}= (the name this transformers version uses)")
    return next(iter(given.values()), None)


def put_cache(model: nn.Module, kw: dict[str, Any], cache: Any) -> None:
    """Give ``cache`` to the call under the keyword ``model`` takes."""
    if cache is not None:
        kw[cache_keyword(model)] = cache


def peek_cache(kw: dict[str, Any]) -> Any:
    """The cache in a call's keywords (either name), left in place."""
    return next((kw[k] for k in _CACHE_NAMES if kw.get(k) is not None), None)


def output_cache(output: Any) -> Any:
    """The cache a forward returned: ``output.cache`` (>= 5.24) or ``output.past_key_values``."""
    for name in _CACHE_NAMES:  # "cache" first: reading the old name on new releases logs a deprecation
        cache = getattr(output, name, None) if not isinstance(output, tuple) else None
        if cache is not None:
            return cache
    return None


# --- cache tags ------------------------------------------------------------------------------------

def tags(cache: Any) -> dict[str, tuple[str, int]]:
    """Adapter name -> (``"prompt"`` | ``"prefix"``, N) for the virtual tokens held by ``cache``."""
    return getattr(cache, _TAG, {}) if cache is not None else {}


def tag(cache: Any, name: str, kind: str, n: int) -> None:
    cache.__dict__.setdefault(_TAG, {})[name] = (kind, n)


def real_length(cache: Any) -> int:
    """Cached positions that are real tokens or prompt tokens (everything but prefixes)."""
    if cache is None:
        return 0
    prefixes = sum(n for kind, n in tags(cache).values() if kind == "prefix")
    return cache.get_seq_length() - prefixes


def check_fresh(cache: Any, name: str, method: str) -> None:
    """Refuse a cache that already holds tokens computed without adapter ``name``."""
    from transformers import Cache

    if cache is not None and not isinstance(cache, Cache):
        raise ValueError(f"{method} needs the KV cache (cache= / past_key_values=) to be a transformers Cache "
                         f"(e.g. DynamicCache), not {type(cache).__name__}")
    if real_length(cache) > 0:
        raise ValueError(
            f"the KV cache holds {real_length(cache)} tokens computed without adapter {name!r}; "
            "start from an empty cache with the adapter active (or disable the adapter to reuse it)"
        )


def tag_output(output: Any, name: str, kind: str, n: int) -> None:
    """Tag the cache a forward returned (the model may have created it) as holding our tokens."""
    from transformers import Cache

    cache = output_cache(output)
    if isinstance(cache, Cache):
        tag(cache, name, kind, n)


# --- the attention layout ------------------------------------------------------------------------

@dataclass(frozen=True)
class KVLayout:
    """What one layer's cached keys and values look like: ``(B, num_heads, T, head_dim)`` each."""

    num_layers: int
    num_heads: int
    head_dim: int


def _unsupported(model: nn.Module, why: str) -> ValueError:
    return ValueError(
        f"prefix tuning does not support {type(model).__name__}: {why}. Use prompt tuning or P-tuning "
        "(virtual tokens at the input) or LoRA instead"
    )


def _checkpointing(model: nn.Module) -> ValueError:
    disable = next((f for f in ("activation_checkpointing_disable", "gradient_checkpointing_disable")
                    if hasattr(model, f)), "gradient_checkpointing_disable")
    return ValueError("prefix tuning passes the prefix through the KV cache, which activation (gradient) "
                      f"checkpointing drops while training: call model.{disable}()")


def kv_layout(model: nn.Module) -> KVLayout:
    """Read the per-layer key/value shapes by running one token into an empty ``DynamicCache``.

    The probe is the ground truth for what a prefix must look like, and it refuses layouts a
    prefix cannot serve: sliding-window or linear-attention layers (the prefix would fall out of
    the window), layers of different shapes, keys and values of different widths (multi-latent
    attention), and models that never write to the cache.
    """
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    from deltatune.core.active import using

    config = text_config(model)
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"}:
        raise _unsupported(model, f"its layers include {sorted(kinds - {'full_attention'})} attention")
    if any(getattr(m, "gradient_checkpointing", False) for m in model.modules()):
        raise _checkpointing(model)
    embedding = model.get_input_embeddings()
    ids = torch.zeros(1, 1, dtype=torch.long, device=embedding.weight.device)
    cache, keyword = DynamicCache(config=model.config), cache_keyword(model)
    try:
        with torch.no_grad(), using(model, ()):
            model(input_ids=ids, use_cache=True, **{keyword: cache})
    except Exception as e:  # any failure means the model cannot take a prefix this way
        raise _unsupported(model, f"it fails when given a KV cache as {keyword}= ({type(e).__name__}: {e})") from e
    layers = cache.layers
    if not layers or any(type(layer) is not DynamicLayer or layer.get_seq_length() != 1 for layer in layers):
        raise _unsupported(model, f"it does not keep keys and values in the KV cache ({keyword}=) for every layer")
    shapes = {(layer.keys.shape[1], layer.keys.shape[3], layer.values.shape[3]) for layer in layers}
    if len(shapes) != 1:
        raise _unsupported(model, f"its layers have different key/value shapes {sorted(shapes)}")
    heads, key_dim, value_dim = shapes.pop()
    if key_dim != value_dim:
        raise _unsupported(model, f"its keys ({key_dim}) and values ({value_dim}) differ in width")
    return KVLayout(num_layers=len(layers), num_heads=heads, head_dim=key_dim)


# --- the prefix hooks ----------------------------------------------------------------------------

def fill_prefix(cache: Any, model: nn.Module, kv: Tensor, batch: int) -> Any:
    """Append the prefix ``kv`` ``(L, 2, H, N, D)`` to every layer of ``cache`` (a new one if None)."""
    from transformers import DynamicCache

    if cache is None:
        cache = DynamicCache(config=model.config)
    elif not isinstance(cache, DynamicCache):
        raise ValueError(f"prefix tuning fills a DynamicCache; got {type(cache).__name__}: pass no cache, or a "
                         "DynamicCache (in generate, leave cache_implementation unset)")
    for i in range(kv.shape[0]):
        k = kv[i, 0].unsqueeze(0).expand(batch, -1, -1, -1)  # (B, H, N, D)
        v = kv[i, 1].unsqueeze(0).expand(batch, -1, -1, -1)
        cache.update(k, v, i)
    return cache


def prefix_hooks(model: nn.Module, layer: Any, name: str) -> list[Any]:
    """Forward pre-hook (put the prefix in the cache, shift the inputs) and post-hook (check it was used)."""
    method = "prefix tuning"
    checkpointable = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]

    def before(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict] | None:
        if not is_active(layer, name, method):
            return None
        if module.training and any(m.gradient_checkpointing for m in checkpointable):
            raise _checkpointing(module)
        kw = bind_inputs(module, args, kwargs)
        adapter = find_part(layer, name, KeyValuePrefix)
        batch, length = input_length(kw)
        cache = take_cache(module, kw)
        if name not in tags(cache):
            check_fresh(cache, name, method)
            dtype = module.get_input_embeddings().weight.dtype  # read per call: the model may be cast after attach
            kv = adapter.key_values().to(dtype)  # (L, 2, H, N, D)
            n = kv.shape[3]
            if kw.get("attention_mask") is None:  # encoders need the mask to know the keys are longer
                cache_length = cache.get_seq_length() if cache is not None else 0
                kw["attention_mask"] = torch.ones(batch, cache_length + length, dtype=torch.long, device=kv.device)
            cache = fill_prefix(cache, module, kv, batch)
            tag(cache, name, "prefix", n)
        put_cache(module, kw, cache)
        n = tags(cache)[name][1]
        extend_mask(kw, n)
        shift_positions(kw, n, include_virtual=False)
        return (), kw

    def after(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        # The final 2-D mask covers every cached position plus this call's tokens (whatever other
        # virtual-token hooks did), so after the forward each layer's cache must be that long.
        cache, mask = peek_cache(kwargs), kwargs.get("attention_mask")
        if name not in tags(cache) or not is_active(layer, name, method):
            return
        lengths = [cache.get_seq_length(i) for i in range(len(cache.layers))]
        expected = mask.shape[-1] if isinstance(mask, Tensor) and mask.dim() == 2 else lengths[0]
        if any(length != expected for length in lengths):
            raise RuntimeError(
                f"the model did not attend to the prefix of adapter {name!r} (cache lengths {lengths}, expected "
                f"{expected}): this model or transformers version does not use the KV cache the way prefix "
                "tuning needs (see tests/integrations/test_transformers_cache.py)"
            )

    return [
        model.register_forward_pre_hook(before, with_kwargs=True),
        model.register_forward_hook(after, with_kwargs=True),
    ]
