"""Many adapters on one base: per-example routing in a mixed batch, load / delete (combining
several active adapters on a layer: ``core/composition.py``).

One frozen base serves many tasks. Adapters are attached (or loaded) side by side under their
names; switching is ``set_active`` / ``using`` (no module is re-injected), and in a *mixed batch*
every example names its own adapter, or ``None`` for the bare base::

    with deltatune.routing(model, adapter_names=["sst", None, "news", "sst"]):
        logits = model(**batch).logits          # row i as if only adapter_names[i] were active
        out = model.generate(**batch)           # causal LMs: the names follow the rows

How a routed layer computes (chosen per layer, once per ``routing`` block):

- every example names the same adapters there: the ordinary forward (fused kernels and all);
  through a :class:`Router` opened with ``stack_uniform`` (a server), a batch whose rows all name
  one low-rank adapter adds it from the stack instead, with two 2-D products read straight from
  its slot (``core.stacking.single``): no gather and no batched product of tiny matrices;
- each example names at most one adapter and all of them are *low-rank* (see ``core.contract.LowRank``):
  one batched path. The layer's low-rank adapters are stacked once (``core/stacking.py``: ranks
  zero-padded, scaling folded in, slot ``n`` zero for the bare base); per call, gather one slot
  per example and add two ``bmm`` products to the base output, no Python loop over adapters. The
  stack is cached per layer, dropped when any of its adapters is detached and rebuilt when one is
  replaced or edited in place; it is a copy, so it costs as much memory again as the layer's
  low-rank adapters;
- anything else (other methods, ``modules_to_save`` heads, several adapters per example, a layer
  in training mode, or gradients wanted for the adapters): the examples are grouped by adapter
  and each group runs the ordinary forward on its rows. Serve under ``torch.inference_mode()``
  (or with the adapters frozen, as ``load_adapter`` leaves them) to get the batched path.

Generation: the batch dimension must come first in every adapted layer's input. ``generate``
keeps the batch size, so the names stay aligned with the rows; when it repeats each row ``k``
times (beam search, ``num_return_sequences``) the router sees ``k·n`` rows and repeats each name
``k`` times in place (``repeat_interleave``), which is how transformers expands inputs.
Model-level adapters that act through forward hooks rather than layers are not routed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from deltatune.core import products
from deltatune.core.active import using
from deltatune.core.inject import detach
from deltatune.core.records import known
from deltatune.core.contract import is_low_rank
from deltatune.core.layer import AdaptedLayer
from deltatune.core.products import plain_linear
from deltatune.core.stacking import Span, Stack, batched, segments, single, spans, stack_of

class Unpackable(ValueError):
    """``Router.route(..., lengths)``: a layer's adapters cannot serve a packed row."""


Key = tuple[str, ...]  # the adapters one example runs through on one layer, innermost first
Choice = str | None | Sequence[str]
T = TypeVar("T")


def _layers(model: nn.Module) -> list[AdaptedLayer]:
    """The adapted layers, without walking through the adapters themselves (dozens of them)."""
    found, todo = [], [model]
    while todo:
        module = todo.pop()
        if isinstance(module, AdaptedLayer):
            found.append(module)
            todo.append(module.base)  # a block-level adapter may wrap adapted layers
        else:
            todo.extend(m for m in module._modules.values() if m is not None)
    return found


# --- the router of one layer ------------------------------------------------------------------


class _Route:
    """``AdaptedLayer.router`` for one ``routing`` block: the per-example adapters of one layer.

    ``keys[i]`` names the adapters row ``i`` runs through on this layer (``()``: the base); model-
    level hooks read it to tell whether their adapter applies to all rows, none, or some.
    """

    def __init__(self, model: nn.Module, layer: AdaptedLayer, keys: list[Key]) -> None:
        self.keys = keys
        distinct = list(dict.fromkeys(keys))
        self.uniform: Key | None = distinct[0] if len(distinct) == 1 else None
        self.stack: Stack | None = None
        if self.uniform is None and all(
            len(k) == 0 or (len(k) == 1 and is_low_rank(layer.adapters[k[0]])) for k in distinct
        ):
            self.stack = stack_of(model, layer)
            device = self.stack.AB.device
            self.slots = torch.tensor([self.stack.index[k[0]] if k else self.stack.zero for k in keys], device=device)
        self._groups: dict[int, list[tuple[Key, Tensor]]] = {}
        self._gathered: Tensor | None = None  # the rows' factors, gathered from the stack once

    slot: int | None = None  # every row on the adapter in this slot of ``stack`` (a homogeneous batch)

    runs: list[Span] | None = None  # one packed row: each example's run of tokens and its slot

    @classmethod
    def planned(cls, keys: list[Key], uniform: Key | None, stack: Stack | None, slots: Tensor | None,
                slot: int | None = None, runs: list[Span] | None = None) -> _Route:
        """A route whose parts a :class:`Router` computed once for many layers alike."""
        route = cls.__new__(cls)
        route.keys, route.uniform, route.stack, route._groups, route._gathered = keys, uniform, stack, {}, None
        if slots is not None:
            route.slots = slots
        route.slot, route.runs = slot, runs
        return route

    def _repeat(self, rows: int) -> int:
        n = len(self.keys)
        if rows % n:
            raise ValueError(
                f"a routed layer received {rows} rows for {n} adapter names; per-example routing needs "
                "the batch first in every adapted layer (and a batch of len(adapter_names) rows, or a multiple "
                "of it for beam search)"
            )
        return rows // n

    def __call__(self, layer: AdaptedLayer, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if self.uniform is not None:
            return layer.run(x, self.uniform, *args, **kwargs)
        stacked = self.stack is not None and not layer.training and not (self.stack.trainable and torch.is_grad_enabled())
        if stacked and self.slot is not None:  # homogeneous: every row on one adapter, no gather
            return single(_base_output(layer.base, x, args, kwargs), x, self.stack, self.slot)
        if self.runs is not None:  # one packed row (Router.route with lengths)
            if not stacked:
                raise RuntimeError("a packed row is served from the stacked factors only: no training, no adapter gradients")
            return segments(_base_output(layer.base, x, args, kwargs), x, self.stack, self.runs)
        repeat = self._repeat(x.shape[0])
        if stacked:
            slots = self.slots if repeat == 1 else self.slots.repeat_interleave(repeat)
            AB = self._gathered
            if AB is None or AB.dtype != x.dtype or AB.shape[0] != slots.shape[0]:
                AB = self.stack.AB.index_select(0, slots).to(x.dtype)  # (b, r, d_in + d_out)
                # Kept for the next call with these rows (a server's decode steps), if small.
                if not torch.is_grad_enabled() and AB.numel() * AB.element_size() <= _GATHERED_BYTES:
                    self._gathered = AB
            return batched(_base_output(layer.base, x, args, kwargs), x, self.stack, slots, AB)
        return self._grouped(layer, x, repeat, args, kwargs)

    def _grouped(self, layer: AdaptedLayer, x: Tensor, repeat: int, args: tuple, kwargs: dict) -> Tensor:
        rows = x.shape[0]
        if rows not in self._groups:
            by_key: dict[Key, list[int]] = {}
            for i, key in enumerate(self.keys):
                by_key.setdefault(key, []).extend(range(i * repeat, (i + 1) * repeat))
            self._groups[rows] = [(k, torch.tensor(v, device=x.device)) for k, v in by_key.items()]
        out: Tensor | None = None
        for key, idx in self._groups[rows]:
            def pick(v: Any, idx: Tensor = idx) -> Any:  # extra arguments with a batch dimension follow the rows
                return v.index_select(0, idx) if isinstance(v, Tensor) and v.dim() and v.shape[0] == rows else v
            y = layer.run(x.index_select(0, idx), key, *map(pick, args), **{k: pick(v) for k, v in kwargs.items()})
            if out is None:
                out = y.new_empty((rows, *y.shape[1:]))
            out.index_copy_(0, idx, y)
        assert out is not None
        return out


def _base_output(base: Any, x: Tensor, args: tuple, kwargs: dict) -> Tensor:
    """The frozen layer's output; a plain Linear's on the adapter kernels' CPU engine (products.py)
    when no gradient is needed, so a mixed batch runs its base product as fast as one adapter does."""
    if not args and not kwargs and plain_linear(base) and not (torch.is_grad_enabled() and x.requires_grad):
        return products.linear(x, base.weight, base.bias)
    return base(x, *args, **kwargs)


_GATHERED_BYTES = 4 << 20  # a route keeps its rows' gathered factors up to this size per layer


# --- public API -------------------------------------------------------------------------------


def _unmerged_layers(model: nn.Module) -> list[AdaptedLayer]:
    layers = _layers(model)
    for layer in layers:
        if layer.merged:  # they would apply to every row
            raise RuntimeError(f"adapters {layer.merged} are merged into the base weights; unmerge(model) first")
    return layers


def _key(model: nn.Module, choice: Choice) -> Key:
    if choice is None:
        return ()
    names = (choice,) if isinstance(choice, str) else tuple(choice)
    for n in names:
        if not isinstance(n, str):
            raise ValueError(f"adapter choices are names, None or lists of names; got {choice!r}")
        known(model, n)
    return names


@contextlib.contextmanager
def routing(model: nn.Module, adapter_names: Sequence[Choice]) -> Iterator[nn.Module]:
    """Run a mixed batch: row ``i`` uses ``adapter_names[i]`` (a name, ``None`` for the bare
    base, or a list of names applied as with ``using``). Restores the layers' routers on exit.

    The active adapters are ignored inside the block. Merged adapters cannot be routed (they are
    part of the base weights for every row): unmerge first.
    """
    if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence) or not adapter_names:
        raise ValueError("adapter_names must be a non-empty list with one entry per example, e.g. ['a', None, 'b']")
    keys = [_key(model, c) for c in adapter_names]
    layers = _unmerged_layers(model)
    saved = [(layer, layer.router) for layer in layers]
    distinct = list(dict.fromkeys(keys))
    try:
        for layer in layers:
            have = layer.adapters._modules  # names absent from a layer run its base there
            here = {k: tuple(n for n in k if n in have) for k in distinct}
            layer.router = _Route(model, layer, [here[k] for k in keys])
        yield model
    finally:
        for layer, router in saved:
            layer.router = router


class Router:
    """``routing`` for a server that re-routes its rows every step: open once, :meth:`route` often.

    Opening checks the layers (no merged adapters) and takes their routers over; :meth:`route`
    points every routed layer at new per-row names, computing the keys and stack slots once per
    group of layers that hold the same adapters, so changing the rows costs little more than one
    layer's worth of work, however many layers there are. The stacks are checked (and built) on
    first use in a router and then trusted: **attach, detach or edit no adapter while a router is
    open**; :meth:`close` it first and open a new one afterwards. ``previous``: the router open
    before (closed); its stacks lend the rows of adapters that are still attached and unchanged,
    so attaching one adapter among many rebuilds one row per layer, not all of them (and, with as
    many adapters as before, its stack tensors are taken over: ``previous`` must not route again).
    ``changed``: the names attached or edited since ``previous`` opened; the caller vouches that
    every other adapter's tensors are as they were, so they are not walked and checked again.
    """

    def __init__(self, model: nn.Module, previous: Router | None = None, changed: Iterable[str] | None = None,
                 stack_uniform: bool = False) -> None:
        self.model = model
        # Rows that all use one low-rank adapter take it from the stack too, with two 2-D products
        # read from its slot (``core.stacking.single``; equal up to float rounding, not bit for
        # bit): on CPU cheaper than the ordinary forward's autograd kernel and than a gather.
        self.stack_uniform = stack_uniform
        self.layers = _unmerged_layers(model)
        self._saved: list[tuple[AdaptedLayer, Any]] | None = [(layer, layer.router) for layer in self.layers]
        self._stacks: dict[AdaptedLayer, Stack] = {}
        self._reuse = dict(previous._stacks) if previous is not None else {}
        # With ``changed`` given, every other adapter is vouched unchanged since ``previous``.
        self._trusted = None if changed is None or previous is None else set(changed)
        # Per layer: its adapters' names, and its low-rank ones in attach order (the stack's rows).
        self._signature: dict[AdaptedLayer, tuple[frozenset[str], frozenset[str]]] = {}
        self._low: dict[AdaptedLayer, list[str]] = {}
        for layer in self.layers:
            modules = layer.adapters._modules
            low = [n for n, a in modules.items() if is_low_rank(a)]  # type: ignore[arg-type]
            self._low[layer] = low
            self._signature[layer] = (frozenset(modules), frozenset(low))
        self.names: list[Choice] | None = None

    def _stack_of(self, layer: AdaptedLayer) -> Stack:
        stack = self._stacks.get(layer)
        if stack is None:
            reuse = self._reuse.pop(layer, None)
            trusted = frozenset() if self._trusted is None or reuse is None else frozenset(
                n for n in reuse.names if n not in self._trusted)
            stack = self._stacks[layer] = stack_of(self.model, layer, reuse, trusted, self._low[layer])
        return stack

    def route(self, adapter_names: Sequence[Choice], lengths: Sequence[int] | None = None) -> None:
        """Row ``i`` of the next forward passes uses ``adapter_names[i]`` (as in ``routing``).

        ``lengths``: the examples are *packed* instead, one after another in one row (a server's
        prefill without padding): example ``i`` is the next ``lengths[i]`` tokens. Layers must act
        on each token alone (as linear layers and their adapters do; the caller keeps examples
        from attending to each other). Refused with ``Unpackable``, before any layer is re-routed,
        when a layer would need the grouped fallback (see the module docs); route rows instead.
        """
        if self._saved is None:
            raise RuntimeError("this router is closed; open a new one")
        if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence) or not adapter_names:
            raise ValueError("adapter_names must be a non-empty list with one entry per example, e.g. ['a', None, 'b']")
        if lengths is not None and len(lengths) != len(adapter_names):
            raise ValueError(f"{len(lengths)} lengths for {len(adapter_names)} packed examples")
        keys = [_key(self.model, c) for c in adapter_names]
        distinct = list(dict.fromkeys(keys))
        plans: dict[tuple, tuple] = {}
        for layer in self.layers:
            have, low = self._signature[layer]
            if (have, low) not in plans:
                here = {k: tuple(n for n in k if n in have) for k in distinct}
                layer_keys = [here[k] for k in keys]
                seen = list(dict.fromkeys(layer_keys))
                uniform = seen[0] if len(seen) == 1 else None
                low_rank = all(len(k) == 0 or (len(k) == 1 and k[0] in low) for k in seen)
                one = uniform[0] if uniform and low_rank and self.stack_uniform else None
                if one is not None:
                    uniform = None
                batched = uniform is None and low_rank
                if lengths is not None and uniform is None and not batched:
                    raise Unpackable(f"adapters {seen} on one layer need grouping by example; route rows, not a packed one")
                plans[(have, low)] = (layer_keys, uniform, batched, one, {})
        for layer in self.layers:
            layer_keys, uniform, batched, one, slots_by = plans[self._signature[layer]]
            stack, slots, slot, runs = None, None, None, None
            if batched:
                stack = self._stack_of(layer)
                if one is not None:
                    slot = stack.index[one]
                else:
                    where = (stack.AB.device, tuple(stack.index.items()))
                    planned = slots_by.get(where)
                    if planned is None:
                        listed = [stack.index[k[0]] if k else stack.zero for k in layer_keys]
                        planned = slots_by[where] = (spans(listed, list(lengths), stack.zero) if lengths is not None
                                                     else torch.tensor(listed, device=stack.AB.device))
                    runs, slots = (planned, None) if lengths is not None else (None, planned)
            layer.router = _Route.planned(layer_keys, uniform, stack, slots, slot, runs)
        self.names = None if lengths is not None else list(adapter_names)

    @torch.no_grad()
    def swap(self, old: str, new: str) -> bool:
        """Adapter ``new`` took over ``old``'s modules in place (``core.stored.reinstall``, a
        server's cache swap): follow it without re-opening, the one exception to "attach, detach
        or edit no adapter while a router is open". Only ``old``'s slot of each stack is rewritten
        (no walk of the model, no check of the others); the next :meth:`route` re-plans. False
        when ``new`` is not where ``old`` was or a stack cannot take it: close and re-open."""
        if self._saved is None:
            raise RuntimeError("this router is closed; open a new one")
        sets: dict[tuple, tuple[frozenset[str], frozenset[str]]] = {}
        for layer in self.layers:
            have, low = self._signature[layer]
            if old not in have:
                continue
            if new not in layer.adapters._modules:  # (old may be back already, in another's modules)
                return False
            names = [n for n in self._low[layer] if n != old] + ([new] if old in low else [])
            signature = sets.get((have, low))
            if signature is None:
                signature = sets[(have, low)] = ((have - {old}) | {new}, frozenset(names))
            self._signature[layer], self._low[layer] = signature, names
            # The stack built here, or lent by the previous router. (rename dropped it from the
            # records' caches; a router opened next takes its tensor over from this one.)
            for stack in (self._stacks.get(layer), self._reuse.get(layer)):
                if stack is not None and old in stack.index and not stack.swap(layer, old, new, names):
                    return False
        if self._trusted is not None:
            self._trusted.add(new)
        self.names = None  # the next route() re-plans every layer
        return True

    def close(self) -> None:
        """Give the layers their routers back (idempotent)."""
        if self._saved is not None:
            for layer, router in self._saved:
                layer.router = router
            self._saved = None
        self._reuse.clear()

    def __enter__(self) -> Router:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def delete_adapter(model: nn.Module, name: str) -> None:
    """Detach adapter ``name`` and drop everything that refers to it, so its memory is freed.

    The same as ``detach(model, name)``: the adapter's record, with its routing stacks, goes too.
    """
    detach(model, name)


def run_grouped(model: nn.Module, choices: Sequence[Choice], fn: Callable[[list[int]], Sequence[T]]) -> list[T]:
    """For callers that batch their own data (``deltatune predict`` with several adapters).

    ``fn(indices)`` returns one result per index; it runs once per distinct choice, with that
    adapter active (``None``: the bare base), and the results come back in input order. Equal to
    routing every example on its own, without needing the batches to carry the names.
    """
    keys = [_key(model, c) for c in choices]
    _unmerged_layers(model)
    groups: dict[Key, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    results: list[Any] = [None] * len(keys)
    for key, indices in groups.items():
        with using(model, key):
            out = list(fn(indices))
        if len(out) != len(indices):
            raise RuntimeError(f"fn returned {len(out)} results for {len(indices)} examples")
        for i, result in zip(indices, out):
            results[i] = result
    return results
