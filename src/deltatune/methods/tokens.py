"""Selected embedding rows: train the embeddings of chosen tokens only.

    E'[t] = R[t]  for t ∈ T (the selected token ids),    E'[t] = E[t]  otherwise
    embed(ids) = E'[ids]                                   (Δ = R − E[T], R initialised to E[T])

The *specification* family of the Delta Tuning taxonomy; the usual recipe for teaching a model new
tokens (added to the tokenizer, with the embedding matrix resized) or re-learning a few existing
ones. Hugging Face PEFT calls it ``TrainableTokensConfig`` (tested for parity).

The adapter stores the trained rows ``R`` (k × d) themselves, not a delta: rows of newly added
tokens start from a random initialisation when the embedding is resized, so a delta saved on one
resized model would land on different random rows in the next process, whereas the rows reproduce
the same embeddings on any base with the same vocabulary (PEFT stores values for the same reason).
In forward the replacement is written as a correction, ``base(ids) + (R − E₀)[ids]`` on the selected
ids, ``E₀`` the rows as they were when the adapter attached (kept: k × d more), so adapters stacked
inside this one (e.g. LoRA on the embedding) keep their effect exactly as they do once ``R`` is merged
into ``E`` (merging adds ``R − E₀`` to what is there, which is ``R`` itself when nothing else merged). The base stays bit-identical; merging writes ``R`` into
``E[T]`` and keeps the overwritten rows, so unmerging restores them exactly.

Tied output head: when the embedding matrix is shared with an ``nn.Linear`` output layer (GPT-2,
many small LMs), the selected rows change both, as they would in the shared matrix. The head is
adapted too, by a :class:`TiedTokenLogits` adapter without tensors of its own that adds
``x (R − E[T])ᵀ`` to the selected tokens' logits; merged and unmerged models then agree, and the
head follows switching, routing and merging like any adapted layer.

Which rows: ``token_ids``, or the rows at and above ``original_vocab_size`` (the vocabulary before
new tokens were added), or both; with neither, every row trains. Plain ``nn.Embedding`` lookups and
``nn.EmbeddingBag`` in ``sum`` / ``mean`` mode are supported (no ``max_norm``, no subclass with its
own forward, e.g. scaled embeddings). On a bag the correction is the base's own reduction over
``R − E[T]`` (a bag is linear in its table), so merged and unmerged bags agree.

New IDs (a recommender's new items, a tokenizer's new tokens without transformers): :func:`grow_table`
gives a table ``n`` more rows, the old rows copied bit for bit; ``TokensConfig(original_vocab_size=V)``
then trains exactly the new rows while the old ones stay frozen::

    old = grow_table(model, "item_embeddings", 120)     # V -> V + 120 rows; returns V
    dt.attach(model, dt.TokensConfig(target="item_embeddings", original_vocab_size=old))
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deltatune.config import AdapterConfig, Target
from deltatune.core.layer import Adapter, AdaptedLayer, logical_get, logical_modules
from deltatune.core.layers import bag_like, linear_bag
from deltatune.core.targeting import select


class TokenRows(Adapter):
    """Trainable rows ``R`` (k × d) replacing the selected rows of the embedding lookup."""

    def __init__(self, weight: Tensor, token_ids: Tensor) -> None:
        super().__init__()
        num_embeddings, k = weight.shape[0], token_ids.numel()
        self.register_buffer("token_ids", token_ids.to(torch.long).clone())            # (k,)
        slot = torch.full((num_embeddings,), k, dtype=torch.long, device=weight.device)
        slot[self.token_ids] = torch.arange(k, device=weight.device)
        self.register_buffer("slot", slot, persistent=False)                           # (V,): id -> row of R, k = none
        self.rows = nn.Parameter(weight.detach()[self.token_ids].clone())             # (k, d)
        # E[T] as it was when the adapter attached: the correction R − E[T] is taken against these rows,
        # not against the live weight, so another adapter merged into the same weight (a hybrid's inner
        # LoRA, merged first) keeps its effect on the selected rows, as it has before merging.
        self.register_buffer("origin", weight.detach()[self.token_ids].clone(), persistent=False)  # (k, d)
        self._overwritten: Tensor | None = None

    def extra_repr(self) -> str:
        return f"rows={self.rows.shape[0]}, dim={self.rows.shape[1]}"

    def forward(self, x: Tensor, base: Any) -> Tensor:
        h = base(x)                                                  # (..., d)
        slot = self.slot[x]                                          # (...,)
        hit = (slot < self.rows.shape[0]).unsqueeze(-1)              # (..., 1)
        at = slot.clamp(max=self.rows.shape[0] - 1)
        mine = F.embedding(at, self.rows)                            # (..., d): R at the selected ids
        frozen = F.embedding(at, self.origin)                        # (..., d): E[T] at the selected ids
        return h + torch.where(hit, mine - frozen, 0.0).to(h.dtype)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        saved = state_dict.get(prefix + "token_ids")
        mine = self.token_ids.cpu()
        # Another number of ids fails the loader's shape check; the same number of other ids must fail here.
        if saved is not None and saved.shape == mine.shape and not torch.equal(saved.cpu(), mine):
            raise ValueError(f"the saved rows are for other token ids than this model selects ({prefix}token_ids); "
                             "load onto a base with the same vocabulary size")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def merge_into(self, base: nn.Module) -> None:
        """``E[T] += R − E₀[T]``: R itself where the rows are still the ones the adapter attached to
        (bit for bit, as a plain merge should give), plus what another adapter merged into them first."""
        current = base.weight[self.token_ids]
        self._overwritten = current.clone()
        rows, origin = self.rows.to(current.dtype), self.origin.to(current.dtype)
        base.weight.index_copy_(0, self.token_ids, torch.where(current == origin, rows, current + (rows - origin)))

    @torch.no_grad()
    def unmerge_from(self, base: nn.Module) -> None:
        if self._overwritten is None:
            raise RuntimeError("these token rows are not merged")
        base.weight.index_copy_(0, self.token_ids, self._overwritten)
        self._overwritten = None


class TokenRowsBag(TokenRows):
    """Token rows on an ``nn.EmbeddingBag`` (sum / mean): ``base(ids, offsets) + bag(R − E[T])``, the
    base's own reduction over a small table: the k corrections, a zero row for every other id and a
    zero padding row (so a mean counts exactly the ids the base counts)."""

    def forward(self, x: Tensor, base: Any) -> Tensor:
        h = base(x)                                                  # (bags, d)
        k, pad = self.rows.shape[0], None
        slot = self.slot[x]                                          # ids -> 0..k-1, k = not selected
        if base.padding_idx is not None:                             # the base skips padding ids: so do we
            pad = k + 1
            slot = torch.where(x == base.padding_idx, pad, slot)
        delta = self.rows - self.origin                              # (k, d)
        table = torch.cat([delta, delta.new_zeros(2, delta.shape[1])])  # (k + 2, d)
        return h + bag_like(base, table.to(h.dtype), slot, padding_idx=pad)


def grow_table(model: nn.Module, name: str, new_rows: int) -> int:
    """Give the ``nn.Embedding`` / ``nn.EmbeddingBag`` at ``name`` ``new_rows`` more rows; returns the
    old number of rows (``original_vocab_size`` for :class:`TokensConfig`).

    The old rows are copied bit for bit; every new row starts at the mean of the old rows (a
    deterministic start, so a grown base is the same in every process; the adapter saves its trained
    rows' values anyway). Grow before attaching adapters: the table is replaced by a new module."""
    if new_rows < 1:
        raise ValueError(f"grow_table: new_rows must be >= 1, got {new_rows}")
    try:
        table = logical_get(model, name)
    except KeyError:
        raise ValueError(f"grow_table: the model has no module {name!r}") from None
    if isinstance(table, AdaptedLayer):
        raise ValueError(f"grow_table: {name!r} has adapters attached; grow the table first, then attach")
    if type(table) not in (nn.Embedding, nn.EmbeddingBag):
        raise ValueError(f"grow_table: {name!r} is a {type(table).__name__}, not an nn.Embedding or nn.EmbeddingBag")
    weight = table.weight
    tied = [n for n, p in model.named_parameters(remove_duplicate=False) if p is weight and not n.startswith(name + ".")]
    if tied:
        raise ValueError(f"grow_table: {name!r} shares its weight with {tied[0]!r}; untie them or grow both "
                         "(transformers: model.resize_token_embeddings)")
    old, dim = weight.shape
    kw = dict(padding_idx=table.padding_idx, max_norm=table.max_norm, norm_type=table.norm_type,
              scale_grad_by_freq=table.scale_grad_by_freq, sparse=table.sparse, device=weight.device, dtype=weight.dtype)
    if isinstance(table, nn.EmbeddingBag):
        grown: nn.Module = nn.EmbeddingBag(old + new_rows, dim, mode=table.mode,
                                           include_last_offset=table.include_last_offset, **kw)
    else:
        grown = nn.Embedding(old + new_rows, dim, **kw)
    with torch.no_grad():
        grown.weight[:old] = weight
        grown.weight[old:] = weight.mean(0)
    grown.weight.requires_grad_(weight.requires_grad)
    grown.train(table.training)
    parent_name, _, attr = name.rpartition(".")
    parent = logical_get(model, parent_name) if parent_name else model
    setattr(parent.base if isinstance(parent, AdaptedLayer) else parent, attr, grown)
    return old


class TiedTokenLogits(Adapter):
    """On an output layer tied to an adapted embedding: ``base(x) + x (R − E[T])ᵀ`` on the selected
    tokens' logits. Holds no tensors: ``source`` (set by ``TokensConfig.on_attach``) owns them."""

    source: TokenRows | None = None

    def link(self, rows: TokenRows | None) -> None:
        self.__dict__["source"] = rows  # a reference, not a submodule: the rows are saved once, by the embedding

    def forward(self, x: Tensor, base: Any) -> Tensor:
        h = base(x)                                                  # (..., V)
        rows = self.source
        if rows is None:
            raise RuntimeError("this tied head is not linked to its embedding rows; attach through deltatune")
        delta = rows.rows - rows.origin                              # (k, d)
        return h.index_add(-1, rows.token_ids, (x @ delta.to(x.dtype).t()).to(h.dtype))  # (..., k) into (..., V)

    @torch.no_grad()
    def merge_into(self, base: nn.Module) -> None:
        """Nothing to do: the embedding's adapter writes the rows into the shared matrix."""

    @torch.no_grad()
    def unmerge_from(self, base: nn.Module) -> None:
        """Nothing to do: the embedding's adapter restores the shared matrix."""


def _parts(layer: AdaptedLayer, name: str, kind: type) -> list[Any]:
    adapter = layer.adapters[name] if name in layer.adapters else None
    return [m for m in adapter.modules() if isinstance(m, kind)] if adapter is not None else []


@dataclasses.dataclass(frozen=True)
class TokensConfig(AdapterConfig):
    """Trainable embedding rows.

    Attributes:
        token_ids: ids whose rows train.
        original_vocab_size: rows from this id up (tokens added to the tokenizer) train.
        target: the embedding layer(s); default the model's input embeddings.
    """

    method: ClassVar[str] = "tokens"
    family: ClassVar[str] = "specification"
    default_target: ClassVar[Target] = ("word_embeddings", "embed_tokens", "wte", "embed_in")

    token_ids: tuple[int, ...] = ()
    original_vocab_size: int | None = None

    def validate(self) -> None:
        ids = (self.token_ids,) if isinstance(self.token_ids, int) else tuple(self.token_ids)
        if not all(isinstance(i, int) and i >= 0 for i in ids):
            raise ValueError(f"tokens token_ids must be non-negative integers, got {self.token_ids!r}")
        object.__setattr__(self, "token_ids", ids)
        if self.original_vocab_size is not None and self.original_vocab_size < 0:
            raise ValueError(f"tokens original_vocab_size must be >= 0, got {self.original_vocab_size}")

    def rows_for(self, num_embeddings: int) -> list[int]:
        """The selected row ids of an embedding with ``num_embeddings`` rows (sorted)."""
        if not self.token_ids and self.original_vocab_size is None:
            return list(range(num_embeddings))
        too_big = [i for i in self.token_ids if i >= num_embeddings]
        if too_big:
            raise ValueError(f"token id {too_big[0]} is out of range for an embedding of {num_embeddings} rows; "
                             "resize the embeddings (model.resize_token_embeddings) first")
        rows = set(self.token_ids)
        if self.original_vocab_size is not None:
            rows |= set(range(self.original_vocab_size, num_embeddings))
        if not rows:
            raise ValueError(f"no rows above original_vocab_size={self.original_vocab_size}: the embedding has "
                             f"{num_embeddings} rows; resize it to the new tokenizer length first")
        return sorted(rows)

    def build(self, name: str, base: nn.Module) -> Adapter | None:
        if type(base) is nn.Linear:  # select_modules only lets in output layers tied to an embedding
            return TiedTokenLogits()
        if type(base) is nn.EmbeddingBag:
            why = linear_bag(base)
            if why:
                raise ValueError(f"tokens cannot adapt {name!r}: {why}")
        elif type(base) is not nn.Embedding or base.max_norm is not None:
            return None
        ids = torch.tensor(self.rows_for(base.num_embeddings), dtype=torch.long, device=base.weight.device)
        return (TokenRowsBag if type(base) is nn.EmbeddingBag else TokenRows)(base.weight, ids)

    def _embeddings(self, model: nn.Module) -> list[str]:
        get_in = getattr(model, "get_input_embeddings", None)
        if self.target is None and callable(get_in):
            try:
                emb = get_in()
            except (NotImplementedError, AttributeError):
                emb = None
            emb = emb.base if isinstance(emb, AdaptedLayer) else emb
            found = [n for n, m in logical_modules(model) if n and m is emb]
            if found:
                return select(model, found[:1], self.exclude, self.layers).names
        return select(model, self.resolved_target, self.exclude, self.layers).names

    def select_modules(self, model: nn.Module) -> list[str]:
        """The embeddings, plus every ``nn.Linear`` that shares an embedding's weight (tied head)."""
        names = self._embeddings(model)
        modules = dict(logical_modules(model))
        weights = {id(modules[n].weight) for n in names if type(modules[n]) is nn.Embedding}
        for n in names:
            if type(modules[n]) is nn.Linear and id(modules[n].weight) not in weights:
                raise ValueError(f"tokens adapts embedding rows; {n!r} is a Linear layer not tied to a targeted "
                                 "embedding: remove it from the target")
        tied = [n for n, m in modules.items() if n and type(m) is nn.Linear and id(m.weight) in weights]
        return names + [n for n in tied if n not in names]

    def on_attach(self, model: nn.Module, name: str) -> list[Any]:
        """Link each tied head's adapter to the rows of the embedding it shares its weight with."""
        layers = [m for m in model.modules() if isinstance(m, AdaptedLayer)]
        rows = {id(layer.base.weight): part for layer in layers for part in _parts(layer, name, TokenRows)}
        for layer in layers:
            for head in _parts(layer, name, TiedTokenLogits):
                head.link(rows.get(id(layer.base.weight)))
                if head.source is None:
                    raise ValueError(f"adapter {name!r}: a tied output layer's embedding is not adapted")
        return []
