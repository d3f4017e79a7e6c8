"""Input plumbing for the virtual-token methods on Hugging Face transformers models.

Prompt tuning, P-tuning and prefix tuning put N virtual positions in front of the real tokens. Every
per-token argument the caller passes (``attention_mask``, ``labels``, ``position_ids``,
``token_type_ids``) is indexed by real tokens and must grow or shift by N to match. The methods do
that in a forward pre-hook on the model (see ``transformers_prompt`` and ``transformers_cache``);
this module holds the pieces they share: binding the forward's arguments to names, shifting them,
and checking at attach time that the model is one these methods can drive.

Only this package imports transformers; the method files import it lazily from ``on_attach``.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor, nn

from deltatune.core.records import configs, placement
from deltatune.core.layer import AdaptedLayer

_PARAMS: dict[type, list[str]] = {}


def bind_inputs(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The forward's arguments as one keyword dict (``model(ids, mask)`` -> ``input_ids=..., attention_mask=...``)."""
    if not args:
        return dict(kwargs)
    names = _PARAMS.get(type(model))
    if names is None:
        kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        names = [p.name for p in inspect.signature(model.forward).parameters.values() if p.kind in kinds]
        _PARAMS[type(model)] = names
    if len(args) > len(names):
        raise TypeError(f"{type(model).__name__}.forward takes {len(names)} positional arguments, got {len(args)}")
    bound = dict(zip(names, args))
    for key in bound.keys() & kwargs.keys():
        raise TypeError(f"{type(model).__name__}.forward got multiple values for argument {key!r}")
    bound.update(kwargs)
    return bound


def prepend(t: Tensor, n: int, value: float | int) -> Tensor:
    """``(B, T, ...) -> (B, n + T, ...)``, the new leading positions filled with ``value``."""
    head = torch.full((t.shape[0], n, *t.shape[2:]), value, dtype=t.dtype, device=t.device)
    return torch.cat([head, t], dim=1)


def extend_mask(kw: dict[str, Any], n: int) -> None:
    """Let every token attend to the n virtual positions: prepend n ones to the 2-D padding mask."""
    mask = kw.get("attention_mask")
    if mask is None:
        return
    if not isinstance(mask, Tensor) or mask.dim() != 2:
        raise ValueError(
            "virtual-token methods extend the 2-D padding mask (batch, tokens); pass attention_mask as "
            f"a 2-D tensor, not {type(mask).__name__} of {getattr(mask, 'dim', lambda: '?')()} dims"
        )
    kw["attention_mask"] = prepend(mask, n, 1)


def shift_positions(kw: dict[str, Any], n: int, *, include_virtual: bool) -> None:
    """Real tokens move n positions to the right; with ``include_virtual`` the virtual ones take 0..n-1.

    Positions the caller computed (``generate`` derives them from the padding mask, so left-padded
    rows start at 0) keep their meaning: position p becomes p + n, as if the row began with the n
    virtual tokens. ``cache_position`` (remote-code models) shifts the same way.
    """
    for key in ("position_ids", "cache_position"):
        pos = kw.get(key)
        if pos is None:
            continue
        shifted = pos + n
        if include_virtual:
            head = torch.arange(n, dtype=pos.dtype, device=pos.device)  # (n,)
            head = head.expand(*pos.shape[:-1], n)                       # (..., n)
            shifted = torch.cat([head, shifted], dim=-1)
        kw[key] = shifted


def shift_token_inputs(kw: dict[str, Any], n: int, length: int) -> None:
    """Prepend to per-token inputs: ``labels`` get -100 (no loss on virtual tokens), token types 0.

    Labels are shifted only when they are per-token (an integer ``(B, T)`` tensor as for causal LM
    or token classification); sequence-level labels ``(B,)`` and float multi-label targets stay.
    """
    labels = kw.get("labels")
    per_token = isinstance(labels, Tensor) and labels.dim() == 2 and labels.shape[1] == length
    if per_token and not labels.is_floating_point():
        kw["labels"] = prepend(labels, n, -100)
    token_types = kw.get("token_type_ids")
    if isinstance(token_types, Tensor):
        kw["token_type_ids"] = prepend(token_types, n, 0)


def is_active(layer: AdaptedLayer, name: str, method: str) -> bool:
    """Whether adapter ``name`` applies to this call: active, or routed to every row of the batch.

    Virtual tokens act on the whole batch, so per-example routing (``deltatune.routing``) can give
    them to all rows or to none; a batch that mixes them is refused.
    """
    router = layer.router
    if router is None:
        return name in layer.active
    rows = [name in key for key in getattr(router, "keys", ())]
    if rows and all(rows):
        return True
    if any(rows):
        raise ValueError(
            f"{method} acts on the whole batch: routing cannot give adapter {name!r} to some rows only; "
            "run the rows that use it as a batch of their own"
        )
    return False


def input_length(kw: dict[str, Any]) -> tuple[int, int]:
    """(batch, tokens) of the current call, from ``input_ids`` or ``inputs_embeds``."""
    ref = kw.get("inputs_embeds")
    ref = kw.get("input_ids") if ref is None else ref
    if ref is None:
        raise ValueError("virtual-token methods need input_ids or inputs_embeds")
    return int(ref.shape[0]), int(ref.shape[1])


def text_config(model: nn.Module) -> Any:
    config = model.config
    get = getattr(config, "get_text_config", None)
    return get(decoder=True) if callable(get) else config


def max_positions(model: nn.Module) -> int | None:
    config = text_config(model)
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def own_part(model: nn.Module, name: str, config: Any) -> int:
    """Index of ``config`` among the parts of adapter ``name`` (0 unless it is part of a hybrid)."""
    return next(i for i, p in enumerate(configs(model)[name].parts) if p is config)


def input_embedding_layer(model: nn.Module, name: str, config: Any, method: str) -> AdaptedLayer:
    """The adapted input embedding that holds ``config``'s adapter, after checking the model.

    Raises ``ValueError`` naming the fix when the model is not a transformers model, the adapter
    sits on another module, the model is encoder-decoder, or the virtual tokens leave no room.
    """
    get_embeddings = getattr(model, "get_input_embeddings", None)
    if not callable(get_embeddings) or not hasattr(model, "config"):
        raise ValueError(
            f"{method} drives a Hugging Face transformers model (one with get_input_embeddings() and config); "
            f"{type(model).__name__} is not one: attach to the transformers model itself"
        )
    embedding = get_embeddings()
    want = next((n for n, m in model.named_modules() if m is embedding), "the input embedding")
    placed = placement(model, name)[own_part(model, name, config)]
    if placed != [want]:
        raise ValueError(
            f"{method} attaches to the input embedding {want!r}, but the target selected "
            f"{', '.join(repr(n) for n in placed)}; leave target unset (the default finds the input embedding)"
        )
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError(
            f"{method} supports encoder-only and decoder-only models; {type(model).__name__} is "
            "encoder-decoder: use LoRA or another layer-level method instead"
        )
    limit = max_positions(model)
    n = config.num_virtual_tokens
    if limit is not None and n >= limit:
        raise ValueError(
            f"num_virtual_tokens={n} leaves no room for input in a model with {limit} positions "
            "(max_position_embeddings); use fewer virtual tokens (typically 10 to 100)"
        )
    assert isinstance(embedding, AdaptedLayer)
    return embedding


def load_token_ids(text: str, tokenizer: str | None, model: nn.Module) -> list[int]:
    """Token ids of ``text`` (no special tokens) with the tokenizer at ``tokenizer`` or the model's path."""
    source = tokenizer or getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")
    if not source:
        raise ValueError(
            "init='text' needs a tokenizer: set tokenizer='path/to/model' in the config, or give init_token_ids"
        )
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"cannot load a tokenizer from {source!r} to turn init_text into tokens ({e}); set tokenizer= to a "
            "local tokenizer directory, or give init_token_ids instead"
        ) from e
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"init_text {text!r} has no tokens; give a non-empty text")
    return list(ids)
