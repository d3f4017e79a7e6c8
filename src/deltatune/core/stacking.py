"""Stacked low-rank factors: every low-rank adapter of one layer side by side, for mixed batches.

``Stack`` holds a layer's low-rank adapters (see ``core.contract.LowRank``) in one tensor,
``[A | (sB)ᵀ]: (n + 1, r, d_in + d_out)``, ranks zero-padded and scaling folded in; slot ``n`` is
zero and serves the bare base. ``batched`` adds each row's own adapter to the base output with two
``bmm`` products, no Python loop over adapters; ``single`` adds one adapter to every row (a
homogeneous batch) with two 2-D products read straight from its slot, no gather; ``segments`` does
the same per run of tokens of one packed row. ``Stack.swap`` rewrites one slot for an adapter
swapped in place. ``stack_of`` caches the stack in the records of the
adapters it holds (``core.records.AdapterRecord.caches``) and rebuilds it only when one of them was
added, removed, replaced or edited in place (weak references plus version counters). Used by
per-example routing (``core/routing.py``).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor, nn

from deltatune.core.contract import is_low_rank
from deltatune.core.records import cached, store
from deltatune.core.layer import AdaptedLayer

_Ref = tuple[Any, int, int]  # (weakref.ref to a tensor, its version counter, its data pointer)


class Stack:
    """All low-rank adapters of one layer, stacked: ``[A | sBᵀ]: (n+1, r, d_in + d_out)``.

    A and sBᵀ share one tensor so that a single gather fetches both for a batch. ``index`` maps
    each name to its slot, ``zero`` is the bare base's slot (all zeros). Built from ``reuse``
    (an earlier stack of the layer), rows of adapters it holds unchanged are copied, or, with as
    many adapters as it had, its tensor is taken over and only the changed slots are written.
    """

    def __init__(self, layer: AdaptedLayer, names: list[str], refs: dict[str, list[_Ref]],
                 reuse: Stack | None = None, trusted: frozenset[str] = frozenset()) -> None:
        self.names = list(names)
        self._by_name = refs  # per name: (weak ref, version, data pointer) of each of its tensors
        with torch.no_grad():
            kept = [n for n in names if reuse is not None and (n in trusted or reuse._holds(n, refs[n]))]
            factors = {n: layer.adapters[n].low_rank_factors() for n in names if n not in kept}
            if factors:
                A0, B0, _ = next(iter(factors.values()))
                dtype, self.d_in, d_out, device = torch.promote_types(A0.dtype, B0.dtype), A0.shape[1], B0.shape[0], A0.device
                r = max(A.shape[0] for A, _, _ in factors.values())
            else:
                assert reuse is not None
                dtype, self.d_in, d_out, device = reuse.AB.dtype, reuse.d_in, reuse.AB.shape[2] - reuse.d_in, reuse.AB.device
                r = reuse.AB.shape[1]
            if reuse is not None and kept and (r > reuse.AB.shape[1] or reuse.AB.shape[2] != self.d_in + d_out
                                               or reuse.AB.dtype != dtype or reuse.AB.device != device):
                kept = []  # shapes differ: build every row anew
                factors = {n: layer.adapters[n].low_rank_factors() for n in names}
            self.trainable = any(ref().requires_grad for n in factors for ref, _, _ in refs[n]) or (
                bool(kept) and reuse is not None and reuse.trainable)
            if kept:
                assert reuse is not None
                r = reuse.AB.shape[1]
            if reuse is not None and kept and len(reuse.index) == len(names):
                # As many adapters as before (one swapped for another, as a server's cache does):
                # take the previous stack's tensor over; kept rows stay in their slots, the others
                # are written into the slots that were freed. The previous stack is retired.
                self.AB, self.zero = reuse.AB, reuse.zero
                self.index = {n: reuse.index[n] for n in kept}
                free = [i for m, i in reuse.index.items() if m not in self.index]
                self.index.update(zip([n for n in names if n in factors], free))
                reuse._retire()
                for n in factors:
                    self.AB[self.index[n]].zero_()
            else:
                self.index = {n: i for i, n in enumerate(names)}
                self.zero = len(names)  # slot of the bare base
                self.AB = torch.zeros((len(names) + 1, r, self.d_in + d_out), dtype=dtype, device=device)
                if reuse is not None and kept:  # rows unchanged since the previous stack: one gather
                    self.AB.index_copy_(0, torch.tensor([self.index[n] for n in kept], device=device),
                                        reuse.AB.index_select(0, torch.tensor([reuse.index[n] for n in kept], device=device)))
            for n, (A, B, s) in factors.items():
                i, k = self.index[n], A.shape[0]
                self.AB[i, :k, : self.d_in] = A
                self.AB[i, :k, self.d_in :] = (B * s).t()

    def _retire(self) -> None:
        """Another stack took this one's tensor: nothing may match or reuse it any more."""
        self._by_name, self.index, self.names = {}, {}, []

    def _holds(self, name: str, refs: list[_Ref] | None) -> bool:
        """Whether this stack's row for ``name`` was built from exactly these tensors, unedited."""
        mine = self._by_name.get(name)
        if mine is None or refs is None:
            return False
        return mine is refs or (len(mine) == len(refs) and all(
            a[0]() is not None and a[0]() is b[0]() and a[1] == b[1] and a[2] == b[2] for a, b in zip(mine, refs)))

    def current(self, names: list[str], refs: dict[str, list[_Ref]]) -> bool:
        return self.names == names and all(self._holds(n, refs[n]) for n in names)

    def swap(self, layer: AdaptedLayer, old: str, new: str, names: list[str]) -> bool:
        """Adapter ``new`` took over ``old``'s module on ``layer`` (``core.stored.reinstall``):
        rewrite ``old``'s slot from its factors, under its name (call under ``torch.no_grad()``). ``names``: the layer's low-rank
        adapters now, in attach order. False, with the stack untouched, when ``old`` has no slot
        here or the factors do not fit it (the caller builds the stack anew)."""
        slot = self.index.get(old)
        if slot is None or new in self.index:
            return False
        A, B, s = layer.adapters[new].low_rank_factors()  # (r, d_in), (d_out, r), scale
        k, d_out = A.shape[0], self.AB.shape[2] - self.d_in
        if k > self.AB.shape[1] or A.shape[1] != self.d_in or B.shape[0] != d_out:
            return False
        row = self.AB[slot]                                          # (r, d_in + d_out), a view
        if k < row.shape[0]:
            row[k:].zero_()
        row[:k].copy_(torch.cat([A.detach(), (B.detach() * s).t()], 1))  # one copy: (k, d_in + d_out)
        del self.index[old]
        self.index[new] = slot
        self._by_name.pop(old, None)  # its own dict (stack_of builds one per stack)
        self._by_name[new] = refs = _refs(layer.adapters[new])  # after the copy: these versions are current
        self.trainable = self.trainable or any(ref().requires_grad for ref, _, _ in refs)
        self.names = list(names)
        return True


def _refs(module: nn.Module) -> list[_Ref]:
    return [(weakref.ref(t), t._version, t.data_ptr()) for t in _tensors(module, [])]


def _low_rank_names(layer: AdaptedLayer) -> list[str]:
    return [n for n, a in layer.adapters.items() if is_low_rank(a)]


def _tensors(module: nn.Module, out: list[Tensor]) -> list[Tensor]:
    """Parameters and buffers of ``module`` (a plain walk: ``parameters()`` costs more, per layer)."""
    out.extend(t for t in (*module._parameters.values(), *module._buffers.values()) if t is not None)
    for child in module._modules.values():
        if child is not None:
            _tensors(child, out)
    return out


def stack_of(model: nn.Module, layer: AdaptedLayer, reuse: Stack | None = None,
           trusted: frozenset[str] = frozenset(), names: list[str] | None = None) -> Stack:
    """The layer's stack, rebuilt only if an adapter was added, removed, replaced or edited.

    ``reuse``: an earlier stack of this layer (perhaps of other adapters) whose rows are copied
    for the adapters it holds unchanged, so attaching one adapter among many costs one row.
    ``trusted``: names the caller vouches are unchanged since ``reuse`` was built; their tensors
    are not walked again. ``names``: the layer's low-rank adapters in attach order, when the caller
    has them (a router computes them once per opening).
    """
    names = _low_rank_names(layer) if names is None else names
    held = reuse._by_name if reuse is not None else {}
    modules = layer.adapters._modules
    refs = {n: held[n] if n in trusted and n in held else _refs(modules[n]) for n in names}  # type: ignore[arg-type]
    key = (Stack, layer)  # kept in the records of the adapters it stacks (core.records.store)
    entry = cached(model, names, key)
    if entry is None or not entry.current(names, refs):
        entry = Stack(layer, names, refs, reuse, trusted)
        store(model, names, key, entry)
    return entry


def batched(out: Tensor, x: Tensor, stack: Stack, slots: Tensor, AB: Tensor | None = None) -> Tensor:
    """``out[i] += s_i · (x[i] A_iᵀ) B_iᵀ`` for every row i, with (A_i, B_i, s_i) its slot's factors
    (``AB``: those factors already gathered, ``stack.AB[slots]``)."""
    rows, d_out = x.shape[0], out.shape[-1]
    if AB is None:
        AB = stack.AB.index_select(0, slots).to(x.dtype)        # (b, r, d_in + d_out)
    A, Bt = AB[..., : stack.d_in], AB[..., stack.d_in :]        # (b, r, d_in), (b, r, d_out): strided views
    # A xᵀ rather than x Aᵀ: with r small, this operand order runs about twice as fast on CPU BLAS.
    ax = torch.bmm(A, x.reshape(rows, -1, x.shape[-1]).transpose(1, 2))  # (b, r, d_in) @ (b, d_in, L) -> (b, r, L)
    if (not torch.is_grad_enabled() and out.is_contiguous() and out.dtype == ax.dtype == Bt.dtype
            and out.data_ptr() != x.data_ptr()):
        out.view(rows, -1, d_out).baddbmm_(ax.transpose(1, 2), Bt)      # in place: no (b, L, d_out) temporary
        return out
    return out + torch.bmm(ax.transpose(1, 2), Bt).view(out.shape).to(out.dtype)


def single(out: Tensor, x: Tensor, stack: Stack, slot: int) -> Tensor:
    """``out += s · (x Aᵀ) Bᵀ`` with every row on the one adapter in ``slot`` (a homogeneous batch).

    The same sum as :func:`batched` with all slots equal, without gathering a copy of the factors
    per row or a batched product of ``b`` tiny matrices: the rows are flattened to ``(N, d_in)``
    and the slot's factors are read in place (strided views of the stack), so a batch on one
    adapter costs two thin products (rank r) beside the base product.
    """
    d_out = out.shape[-1]
    A, Bt = stack.AB[slot, :, : stack.d_in], stack.AB[slot, :, stack.d_in :]  # (r, d_in), (r, d_out): views
    if A.dtype != x.dtype:
        A, Bt = A.to(x.dtype), Bt.to(x.dtype)
    ax = torch.mm(x.reshape(-1, stack.d_in), A.t())                           # (N, d_in) @ (d_in, r) -> (N, r)
    if (not torch.is_grad_enabled() and out.is_contiguous() and out.dtype == ax.dtype
            and out.data_ptr() != x.data_ptr()):
        out.view(-1, d_out).addmm_(ax, Bt)                                    # in place: no (N, d_out) temporary
        return out
    return out + torch.mm(ax, Bt).view(out.shape).to(out.dtype)


Span = tuple[int, int, int]  # (slot, first token, end token) of one packed row


def spans(slot_of: list[int], lengths: list[int], zero: int) -> list[Span]:
    """The runs of one packed row: example ``i`` is the next ``lengths[i]`` tokens, on stack slot
    ``slot_of[i]``; neighbours on one slot merge into one run, bare-base runs (``zero``) are left out."""
    out: list[Span] = []
    start = 0
    for slot, n in zip(slot_of, lengths):
        if slot != zero:
            if out and out[-1][0] == slot and out[-1][2] == start:
                out[-1] = (slot, out[-1][1], start + n)
            else:
                out.append((slot, start, start + n))
        start += n
    return out


def segments(out: Tensor, x: Tensor, stack: Stack, runs: list[Span]) -> Tensor:
    """``out[0, a:b] += s·(x[0, a:b] Aᵀ) Bᵀ`` with (A, B, s) slot ``k``'s factors, for each run
    ``(k, a, b)`` of one packed row ``x: (1, N, d_in)`` (several examples one after another: a
    server's prefill without padding). As :func:`single` on each run's tokens, factors read in
    place; ``out`` is written in place when no gradient is wanted, else a copy."""
    if x.shape[0] != 1:
        raise ValueError(f"a packed batch is one row; got {x.shape[0]} rows")
    if torch.is_grad_enabled() or not out.is_contiguous() or out.data_ptr() == x.data_ptr():
        out = out.clone(memory_format=torch.contiguous_format)
    d_in = stack.d_in
    for slot, a, b in runs:
        A, Bt = stack.AB[slot, :, :d_in], stack.AB[slot, :, d_in:]     # (r, d_in), (r, d_out): views
        if A.dtype != x.dtype:
            A, Bt = A.to(x.dtype), Bt.to(x.dtype)
        ax = torch.mm(x[0, a:b], A.t())                                # (n, d_in) @ (d_in, r) -> (n, r)
        if out.dtype == ax.dtype:
            out[0, a:b].addmm_(ax, Bt)                                 # (n, r) @ (r, d_out), in place
        else:
            out[0, a:b] += torch.mm(ax, Bt).to(out.dtype)
    return out
