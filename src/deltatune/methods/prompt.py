"""Prompt tuning: The Power of Scale for Parameter-Efficient Prompt Tuning (Lester et al., 2021, arXiv:2104.08691).

    h = f([P ; E(x)]),    P ∈ R^{N×d} trainable; the embedding E and the model f frozen

N virtual token embeddings are prepended to the embedded input. Initialisations:

- ``random``: P ~ N(0, σ²) with σ the standard deviation of the embedding table, so the virtual
  tokens start at the scale of real ones (Hugging Face PEFT draws N(0, 1) whatever the scale);
- ``vocab``: the embeddings of N vocabulary tokens drawn uniformly (Lester et al.'s "sampled vocab");
- ``text``: the embeddings of a text (``init_text``, tokenised without special tokens, where PEFT
  keeps them; or ``init_token_ids``), repeated or cut to N tokens. The ids the text became are
  recorded in the saved config, so loading needs no tokenizer.

Where the pieces live: the trainable P sits in an adapter on the model's input embedding, so
save / load / set_active / using / disabled / detach work as for any adapter (the adapter leaves
the embedding's output unchanged). The model-level plumbing (embedding the ids, prepending P,
extending the mask, shifting labels and positions, generation with a KV cache) is a forward
pre-hook on the model, registered by ``on_attach``; it lives in
``integrations/transformers_prompt.py`` and applies only while the adapter is active. The config
declares the capability it needs (``plumbing = VirtualTokens``) and asks ``core.plumbing`` for
its provider, so this file never imports ``integrations/``. Prompt
tuning cannot be merged into the weights, and attaching it changes the outputs.

This file also holds what the virtual-token methods share: finding the input embedding, and
:func:`drop_reparameterization`, which replaces a trained prompt encoder (P-tuning) or prefix
MLP (prefix tuning) by the tensors it produces.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from deltatune.config import AdapterConfig
from deltatune.core.contract import VirtualTokens
from deltatune.core.layers import describe
from deltatune.core.layer import Adapter, AdaptedLayer, Composite, logical_modules
from deltatune.core.parts import find_part, replace_part
from deltatune.core.plumbing import provider
from deltatune.core.targeting import NoMatchError, select

PromptInit = Literal["random", "vocab", "text"]

#: Leaf names of token embeddings in common architectures (documentation and hybrids; with no
#: target the methods ask the model for ``get_input_embeddings()`` instead).
INPUT_EMBEDDINGS = ("word_embeddings", "embed_tokens", "wte", "embed_in")


def input_embedding_names(config: AdapterConfig, model: nn.Module, method: str) -> list[str]:
    """The module name of ``model.get_input_embeddings()``; ``NoMatchError`` for models without one."""
    if config.target is not None:
        return select(model, config.resolved_target, config.exclude, config.layers).names
    get = getattr(model, "get_input_embeddings", None)
    try:
        embedding = get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        embedding = None
    if isinstance(embedding, AdaptedLayer):
        embedding = embedding.base
    names = [n for n, m in logical_modules(model) if m is embedding and n]
    if not names:
        raise NoMatchError(
            f"{method} adds virtual tokens at the input embedding, and {type(model).__name__} has no "
            "get_input_embeddings(); use a transformers model (or a layer-level method such as LoRA)"
        )
    return names[:1]


def initial_prompt(weight: Tensor, n: int, init: str, token_ids: Sequence[int] = ()) -> Tensor:
    """N rows to start the prompt from, given the embedding table ``weight`` (V, d)."""
    table = weight.detach()
    if init == "random" or (init == "text" and not token_ids):
        return torch.randn(n, table.shape[1], device=table.device, dtype=table.dtype) * table.float().std()
    if init == "vocab":
        return table[torch.randint(0, table.shape[0], (n,), device=table.device)].clone()
    bad = [i for i in token_ids if not 0 <= i < table.shape[0]]
    if bad:
        raise ValueError(f"init_token_ids must lie in [0, {table.shape[0]}) for this vocabulary; got {bad[0]}")
    ids = (list(token_ids) * (n // len(token_ids) + 1))[:n]  # repeat, then cut to N
    return table[torch.tensor(ids, device=table.device)].clone()


class PromptEmbedding(Adapter):
    """N trainable virtual token embeddings ``prompt: (N, d)``; the embedding's output is unchanged."""

    def __init__(self, num_virtual_tokens: int, dim: int) -> None:
        super().__init__()
        self.prompt = nn.Parameter(torch.zeros(num_virtual_tokens, dim))  # (N, d)

    @property
    def num_virtual_tokens(self) -> int:
        return self.prompt.shape[0]

    def virtual_tokens(self) -> Tensor:
        return self.prompt  # (N, d)

    def forward(self, x: Tensor, base: Any) -> Tensor:
        return base(x)  # the prompt enters through the model-level hook, not here

    def extra_repr(self) -> str:
        return f"num_virtual_tokens={self.prompt.shape[0]}, dim={self.prompt.shape[1]}"


@dataclasses.dataclass(frozen=True)
class PromptConfig(AdapterConfig):
    """Prompt tuning hyperparameters.

    Attributes:
        num_virtual_tokens: N, the number of virtual tokens.
        init: ``random`` | ``vocab`` | ``text`` (see the module docstring).
        init_text: the text whose embeddings start the prompt (``init="text"``).
        init_token_ids: token ids to start from instead of a text; filled from ``init_text`` on attach.
        tokenizer: where to load the tokenizer for ``init_text`` (default: the model's ``name_or_path``).
    """

    method: ClassVar[str] = "prompt"
    family: ClassVar[str] = "addition"
    suggested_lr: ClassVar[float | None] = 1e-2  # soft prompts need large steps (Lester et al. use 0.3 with Adafactor)
    search_space: ClassVar[dict[str, Any]] = {"num_virtual_tokens": (20, 10, 40)}  # plan / tune / compare --grid
    default_target: ClassVar[Any] = INPUT_EMBEDDINGS
    identity_at_init: ClassVar[bool] = False
    plumbing: ClassVar[Any] = VirtualTokens  # served by integrations/ (core/plumbing.py)

    num_virtual_tokens: int = 20
    init: PromptInit = "random"
    init_text: str | None = None
    init_token_ids: tuple[int, ...] = ()
    tokenizer: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "init_token_ids", tuple(self.init_token_ids))
        super().__post_init__()

    def validate(self) -> None:
        check_virtual_tokens(self, "prompt tuning")
        if self.init not in ("random", "vocab", "text"):
            raise ValueError(f"prompt init must be one of random, vocab, text; got {self.init!r}")
        if self.init == "text" and not (self.init_text or self.init_token_ids):
            raise ValueError("init='text' needs init_text='...' (or init_token_ids=[...])")
        if self.init != "text" and (self.init_text or self.init_token_ids):
            raise ValueError(f"init_text / init_token_ids are used with init='text'; got init={self.init!r}")

    def select_modules(self, model: nn.Module) -> list[str]:
        return input_embedding_names(self, model, "prompt tuning")

    def build(self, name: str, base: nn.Module) -> Adapter | None:
        if (spec := describe(base)) is None or spec.kind != "embedding":  # the input embedding table
            return None
        adapter = PromptEmbedding(self.num_virtual_tokens, base.embedding_dim).to(base.weight.device)
        with torch.no_grad():
            adapter.prompt.copy_(initial_prompt(base.weight, self.num_virtual_tokens, self.init, self.init_token_ids))
        return adapter

    def on_attach(self, model: nn.Module, name: str) -> list[Any]:
        plumbing = provider(self.plumbing)  # integrations/ serves the capability (core/plumbing.py)
        layer = plumbing.input_layer(model, name, self, "prompt tuning")
        if self.init == "text" and not self.init_token_ids:
            assert self.init_text is not None
            ids = tuple(plumbing.token_ids(self.init_text, self.tokenizer, model))
            adapter = find_part(layer, name, VirtualTokens)
            with torch.no_grad():
                adapter.prompt.copy_(initial_prompt(layer.base.weight, self.num_virtual_tokens, "text", ids))
            replace_part(model, name, self, dataclasses.replace(self, init_token_ids=ids))
        return plumbing.hooks(model, layer, name, "prompt tuning")


def check_virtual_tokens(config: Any, method: str) -> None:
    """Checks shared by the virtual-token configs."""
    if not isinstance(config.num_virtual_tokens, int) or config.num_virtual_tokens < 1:
        raise ValueError(f"{method} needs num_virtual_tokens >= 1, got {config.num_virtual_tokens!r}")
    if config.layers is not None:
        raise ValueError(f"{method} works on the whole model, not on chosen blocks: "
                         f"remove layers={list(config.layers)}")


# --- replacing a trained reparameterisation by its output -----------------------------------------

def drop_reparameterization(model: nn.Module, name: str = "default") -> nn.Module:
    """Replace adapter ``name``'s trained reparameterisation by the tensors it produces.

    P-tuning's prompt encoder becomes the N virtual tokens it outputs (a prompt tuning adapter);
    prefix tuning's MLP becomes the prefixes it outputs. Outputs are unchanged; the adapter is then
    smaller, faster, and saves (and loads) without the encoder. Call it after training.
    """
    from deltatune.core.contract import Reparameterized, ReparameterizedConfig
    from deltatune.core.records import adapted_layers, configs

    registered = configs(model).get(name)
    if registered is None:
        raise ValueError(f"no adapter named {name!r} is attached")
    parts = registered.parts
    if not any(isinstance(p, ReparameterizedConfig) and p.reparameterized for p in parts):
        raise ValueError(f"adapter {name!r} ({registered.method}) has no reparameterisation to drop")
    for _, layer in adapted_layers(model):
        if name not in layer.adapters:
            continue
        adapter = layer.adapters[name]
        modules = adapter.parts if isinstance(adapter, Composite) else [adapter]
        for i, module in enumerate(modules):
            if not isinstance(module, Reparameterized):
                continue
            trainable = any(p.requires_grad for p in module.parameters())
            new = module.materialized().requires_grad_(trainable)
            if isinstance(adapter, Composite):
                adapter.parts[i] = new
            else:
                layer.adapters[name] = new
    for part in parts:
        if isinstance(part, ReparameterizedConfig) and part.reparameterized:
            replace_part(model, name, part, part.materialized())
    return model
