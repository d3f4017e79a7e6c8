"""The transformers providers of model-level plumbing (see :mod:`deltatune.core.plumbing`).

``deltatune/__init__.py`` puts :data:`PROVIDERS` into ``core.plumbing.PROVIDERS``; a method that
declares ``plumbing = VirtualTokens`` or ``KeyValuePrefix`` is then served by the classes here,
which delegate to ``transformers_inputs`` (checks, tokenizer), ``transformers_prompt`` (virtual
tokens at the input) and ``transformers_cache`` (key/value prefixes in the cache).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from deltatune.core.contract import KeyValuePrefix, VirtualTokens
from deltatune.core.layer import AdaptedLayer
from deltatune.integrations.transformers_cache import kv_layout, prefix_hooks
from deltatune.integrations.transformers_inputs import input_embedding_layer, load_token_ids
from deltatune.integrations.transformers_prompt import prompt_hooks


class TransformersVirtualTokens:
    """Virtual tokens prepended to a transformers model's input embeddings."""

    def input_layer(self, model: nn.Module, name: str, config: Any, method: str) -> AdaptedLayer:
        return input_embedding_layer(model, name, config, method)

    def token_ids(self, text: str, tokenizer: str | None, model: nn.Module) -> list[int]:
        return load_token_ids(text, tokenizer, model)

    def hooks(self, model: nn.Module, layer: AdaptedLayer, name: str, method: str) -> list[Any]:
        return prompt_hooks(model, layer, name, method)


class TransformersKeyValuePrefix:
    """Key/value prefixes prepended to a transformers model's attention cache."""

    def input_layer(self, model: nn.Module, name: str, config: Any, method: str) -> AdaptedLayer:
        return input_embedding_layer(model, name, config, method)

    def layout(self, model: nn.Module) -> tuple[int, int, int]:
        found = kv_layout(model)
        return found.num_layers, found.num_heads, found.head_dim

    def hooks(self, model: nn.Module, layer: AdaptedLayer, name: str, method: str) -> list[Any]:
        return prefix_hooks(model, layer, name)


PROVIDERS: dict[type, Any] = {VirtualTokens: TransformersVirtualTokens(), KeyValuePrefix: TransformersKeyValuePrefix()}
