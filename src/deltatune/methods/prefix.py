"""Prefix tuning: Prefix-Tuning: Optimizing Continuous Prompts for Generation (Li & Liang, 2021, arXiv:2101.00190).

    head^i = Attn(x W_q^i, [P_k^i ; x W_k^i], [P_v^i ; x W_v^i]),    P_k^i, P_v^i ∈ R^{N×d_kv}, every layer i

N trainable key/value positions in every attention layer: each real token also attends to the N
prefix positions, which are not computed from any input. Real tokens take positions N, N+1, …, as
if the prefix were N earlier tokens (so a prefix equal to the keys and values of real tokens x
reproduces the base model on [x ; y], which the tests check). Optionally reparameterised
(Li & Liang §4.3, for stable training):

    [P_k^1, P_v^1, …, P_k^L, P_v^L] = W₂ tanh(W₁ Z + b₁) + b₂,    Z ∈ R^{N×d_kv}

an MLP of hidden width m = ``projection_dim``. After training, :func:`deltatune.drop_reparameterization`
replaces the MLP by the prefixes it outputs (the saved adapter then holds only the prefixes).

The prefixes are stored flat, ``prefix: (N, L·2·H·D)`` ordered (layer, key/value, head, dim), the
layout of Hugging Face PEFT's ``prompt_embeddings``, so checkpoints convert by copying. Keys and
values have the model's cached shape: H key/value heads of width D (grouped-query models have
fewer key/value heads than query heads). The layout is read from the model on attach and recorded
in the config (``num_layers``, ``num_kv_heads``, ``head_dim``), so a saved adapter rebuilds at full
shape from its config alone (loading, hot swap) and refuses a base model with another layout.

Where the pieces live: the adapter sits on the input embedding (whose output it leaves unchanged)
so the core's save / load / switching apply; the prefixes reach the attention layers through the
model's KV cache, filled by a forward pre-hook. That plumbing, and the check that a model's
attention layout can take a prefix, are in ``integrations/transformers_cache.py``, served for the
capability the config declares (``plumbing = KeyValuePrefix``, see ``core/plumbing.py``): this
file never imports ``integrations/``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from deltatune.config import AdapterConfig
from deltatune.core.contract import KeyValuePrefix
from deltatune.core.layers import describe
from deltatune.core.layer import Adapter
from deltatune.core.parts import find_part, replace_part
from deltatune.core.plumbing import provider
from deltatune.methods.prompt import INPUT_EMBEDDINGS, check_virtual_tokens, input_embedding_names


class PrefixKV(Adapter):
    """Per-layer key/value prefixes, trained directly or produced by an MLP from ``embedding`` Z.

    ``setup`` creates the tensors for the attention layout (L layers, H key/value heads of width
    D): in ``build`` when the config records it, otherwise in ``on_attach`` once the model is probed.
    """

    def __init__(self, num_virtual_tokens: int, projection_dim: int | None = None) -> None:
        super().__init__()
        self.n, self.projection_dim = num_virtual_tokens, projection_dim
        self.layout: tuple[int, int, int] | None = None

    def setup(self, num_layers: int, num_heads: int, head_dim: int, *, device: Any = None, dtype: Any = None) -> None:
        self.layout = (num_layers, num_heads, head_dim)
        width, kv = num_layers * 2 * num_heads * head_dim, num_heads * head_dim
        if self.projection_dim is None:
            self.prefix = nn.Parameter(torch.randn(self.n, width, device=device, dtype=dtype))  # (N, L·2·H·D)
        else:
            self.embedding = nn.Parameter(torch.randn(self.n, kv, device=device, dtype=dtype))  # Z: (N, H·D)
            self.mlp = nn.Sequential(nn.Linear(kv, self.projection_dim), nn.Tanh(),
                                     nn.Linear(self.projection_dim, width)).to(device=device, dtype=dtype)

    @property
    def num_virtual_tokens(self) -> int:
        return self.n

    def flat(self) -> Tensor:
        """All prefixes, ``(N, L·2·H·D)``."""
        if self.layout is None:
            raise RuntimeError("PrefixKV.setup() has not run; attach the adapter with deltatune.attach")
        return self.prefix if self.projection_dim is None else self.mlp(self.embedding)

    def key_values(self) -> Tensor:
        """``(L, 2, H, N, D)``: per layer, the keys then the values, in the cache's layout."""
        assert self.layout is not None
        L, H, D = self.layout
        return self.flat().view(self.n, L, 2, H, D).permute(1, 2, 3, 0, 4)

    def forward(self, x: Tensor, base: Any) -> Tensor:
        return base(x)  # the prefixes enter through the KV cache, not here

    @torch.no_grad()
    def materialized(self) -> PrefixKV:
        """The same prefixes without the MLP (this module itself if it has none)."""
        if self.projection_dim is None:
            return self
        assert self.layout is not None
        flat = self.flat()
        plain = PrefixKV(self.n)
        plain.setup(*self.layout, device=flat.device, dtype=flat.dtype)
        plain.prefix.copy_(flat)
        return plain

    def extra_repr(self) -> str:
        mlp = f", projection_dim={self.projection_dim}" if self.projection_dim else ""
        return f"num_virtual_tokens={self.n}, layout(L, H, D)={self.layout}{mlp}"


@dataclasses.dataclass(frozen=True)
class PrefixConfig(AdapterConfig):
    """Prefix tuning hyperparameters.

    Attributes:
        num_virtual_tokens: N, the prefix length (key/value positions per layer).
        projection_dim: m, the hidden width of the reparameterisation MLP; ``None`` trains the
            prefixes directly.
        num_layers, num_kv_heads, head_dim: the attention layout (L, H, D). Leave unset: attach
            reads it from the model and records it, so a saved adapter is rebuilt at full shape
            and refuses a model with another layout.
    """

    method: ClassVar[str] = "prefix"
    family: ClassVar[str] = "addition"
    suggested_lr: ClassVar[float | None] = 1e-2  # like prompt tuning, learned key/value prefixes need large steps
    search_space: ClassVar[dict[str, Any]] = {"num_virtual_tokens": (20, 10, 40)}  # plan / tune / compare --grid
    default_target: ClassVar[Any] = INPUT_EMBEDDINGS
    identity_at_init: ClassVar[bool] = False
    plumbing: ClassVar[Any] = KeyValuePrefix  # served by integrations/ (core/plumbing.py)

    num_virtual_tokens: int = 20
    projection_dim: int | None = None
    num_layers: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None

    @property
    def layout(self) -> tuple[int, int, int] | None:
        dims = (self.num_layers, self.num_kv_heads, self.head_dim)
        return None if None in dims else dims  # type: ignore[return-value]

    @property
    def reparameterized(self) -> bool:
        return self.projection_dim is not None

    def validate(self) -> None:
        check_virtual_tokens(self, "prefix tuning")
        if self.projection_dim is not None and self.projection_dim < 1:
            raise ValueError("projection_dim must be >= 1 (or unset to train the prefixes directly), "
                             f"got {self.projection_dim}")
        dims = (self.num_layers, self.num_kv_heads, self.head_dim)
        if any(d is not None for d in dims) and (self.layout is None or min(dims) < 1):  # type: ignore[type-var]
            raise ValueError(f"num_layers, num_kv_heads and head_dim go together (all >= 1) or stay unset "
                             f"(read from the model); got {dims}")

    def select_modules(self, model: nn.Module) -> list[str]:
        return input_embedding_names(self, model, "prefix tuning")

    def build(self, name: str, base: nn.Module) -> Adapter | None:
        if (spec := describe(base)) is None or spec.kind != "embedding":  # the input embedding table
            return None
        adapter = PrefixKV(self.num_virtual_tokens, self.projection_dim)
        if self.layout is not None:
            adapter.setup(*self.layout, device=base.weight.device, dtype=base.weight.dtype)
        return adapter

    def on_attach(self, model: nn.Module, name: str) -> list[Any]:
        plumbing = provider(self.plumbing)  # integrations/ serves the capability (core/plumbing.py)
        layer = plumbing.input_layer(model, name, self, "prefix tuning")
        layout = plumbing.layout(model)
        if self.layout is not None and self.layout != layout:
            raise ValueError(
                f"this prefix was made for {self.layout[0]} layers of {self.layout[1]} key/value heads of width "
                f"{self.layout[2]}, but the model has {layout[0]} of {layout[1]} of width {layout[2]}: it belongs "
                "to another base model (leave num_layers/num_kv_heads/head_dim unset for a new adapter)"
            )
        adapter = find_part(layer, name, KeyValuePrefix)
        if adapter.layout is None:
            weight = layer.base.weight
            adapter.setup(*layout, device=weight.device, dtype=weight.dtype)
            replace_part(model, name, self, dataclasses.replace(
                self, num_layers=layout[0], num_kv_heads=layout[1], head_dim=layout[2]))
        return plumbing.hooks(model, layer, name, "prefix tuning")

    def materialized(self) -> PrefixConfig:
        """This config once the MLP is dropped."""
        return dataclasses.replace(self, projection_dim=None)
