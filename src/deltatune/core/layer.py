"""The adapted layer: a frozen base module plus named adapters, applied in a declared order.

An adapter is an ``nn.Module`` whose forward receives the input and the base and returns the
output::

    adapter(x, base) -> Tensor          # base(x) runs the frozen layer

With that single contract every method is one expression (a low-rank update
``base(x) + s * B(A(x))``, a learned scaling ``base(x) * l``, a residual module
``h + up(act(down(h)))`` with ``h = base(x)``), and several
adapters on one layer compose like functions: the second adapter's ``base`` runs the first
adapter around the frozen layer. ``base`` always exposes the frozen module's attributes
(``base.weight``, ``base.stride``...), so a method can read them whatever sits in between.
The contract and the capabilities an adapter may add live in ``core/contract.py``;
:class:`~deltatune.core.contract.Adapter` is re-exported here.

:class:`AdaptedLayer` replaces the original module in its parent (module replacement), so it is
visible in ``print(model)``; ``detach`` puts the original module object back.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from deltatune.core.contract import Adapter

__all__ = ["Adapter", "AdaptedLayer", "Composite", "FullCopy", "call_args", "logical_get", "logical_modules",
           "swap_values", "walk"]


class FullCopy(Adapter):
    """A trainable copy of a whole module (``modules_to_save``): ``forward(x, base) = copy(x)``.

    Used for modules that must train in full, such as a freshly initialised classifier head.
    Merging swaps the trained values into the base module and keeps the originals here, so
    unmerging restores the base exactly.
    """

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        import copy

        self.module = copy.deepcopy(base)
        for p in self.module.parameters():
            p.requires_grad_(True)

    def forward(self, x: Tensor, base: Any) -> Tensor:
        return self.module(x)

    @torch.no_grad()
    def merge_into(self, base: nn.Module) -> None:
        self._swap(base)

    @torch.no_grad()
    def unmerge_from(self, base: nn.Module) -> None:
        self._swap(base)

    def _swap(self, base: nn.Module) -> None:
        mine = dict(self.module.named_parameters())
        swap_values((p, mine[name]) for name, p in base.named_parameters())


@torch.no_grad()
def swap_values(pairs: Iterable[tuple[Tensor, Tensor]]) -> None:
    """Exchange the values of each pair in place: how adapters that hold replacement values for
    base parameters merge (their values go into the base) and unmerge (the originals come back)."""
    for a, b in pairs:
        kept = a.detach().clone()
        a.copy_(b)
        b.copy_(kept)


class Composite(Adapter):
    """Several adapters of one adapter name on one layer (a hybrid), applied in declared order.

    ``forward`` chains the parts like stacked adapters; merging merges each part in turn onto
    the already merged weight (so the chain's semantics are kept) and unmerges in reverse.
    """

    def __init__(self, parts: list[nn.Module]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.merge_atol = max(p.merge_atol if isinstance(p, Adapter) else Adapter.merge_atol for p in parts)

    def forward(self, x: Tensor, base: Any) -> Tensor:
        module = base if isinstance(base, nn.Module) else base.module
        for part in self.parts[:-1]:
            base = _Chain(part, base, module)
        return self.parts[-1](x, base)

    @property
    def mergeable(self) -> bool:
        return all(p.mergeable for p in self.parts)

    @torch.no_grad()
    def merge_into(self, base: nn.Module) -> None:
        for part in self.parts:
            part.merge_into(base)

    @torch.no_grad()
    def unmerge_from(self, base: nn.Module) -> None:
        for part in reversed(self.parts):
            part.unmerge_from(base)


class _Chain:
    """``base`` for the second and later adapters on a layer: runs the inner adapters.

    Attribute access falls through to the frozen module, so ``base.weight`` keeps working.
    """

    __slots__ = ("adapter", "inner", "module")

    def __init__(self, adapter: nn.Module, inner: Any, module: nn.Module) -> None:
        self.adapter = adapter
        self.inner = inner
        self.module = module

    def __call__(self, x: Tensor) -> Tensor:
        return self.adapter(x, self.inner)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.module, name)


class _Bound:
    """``base`` for layers called with extra arguments: binds them to the frozen module."""

    __slots__ = ("module", "args", "kwargs")

    def __init__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.module = module
        self.args = args
        self.kwargs = kwargs

    def __call__(self, x: Tensor) -> Tensor:
        return self.module(x, *self.args, **self.kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.module, name)


def call_args(base: Any) -> tuple[tuple, dict[str, Any]]:
    """The arguments after the input that the adapted layer was called with, whatever adapters sit
    between ``base`` and the frozen module (e.g. an ``nn.EmbeddingBag``'s ``offsets``): an adapter
    that must repeat the base's computation on tensors of its own reads them here."""
    while isinstance(base, _Chain):
        base = base.inner
    if isinstance(base, _Bound):
        return base.args, base.kwargs
    return (), {}


class AdaptedLayer(nn.Module):
    """A frozen base module with named adapters.

    Attributes:
        base: the original module object, untouched (its parameters are frozen by ``attach``).
        adapters: adapter modules by adapter name.
        active: names of the adapters applied in forward, innermost first.
        merged: names of the adapters currently folded into ``base``'s weights, in merge order.
        composition: how several active adapters combine: ``"stack"`` applies them in order (each
            wraps the previous), ``"average"`` takes the mean of their outputs, each adapter
            applied alone around the base.
    """

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.adapters = nn.ModuleDict()
        self.active: tuple[str, ...] = ()
        self.merged: list[str] = []
        self.composition: str = "stack"
        # Per-example routing hook (see core/routing.py); None means "use ``active``".
        self.router: Any = None

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if self.router is not None:
            return self.router(self, x, *args, **kwargs)
        return self.run(x, self.active, *args, **kwargs)

    def run(self, x: Tensor, names: tuple[str, ...], *args: Any, **kwargs: Any) -> Tensor:
        """Apply the named adapters (skipping merged ones) around the base, innermost first."""
        base: Any = self.base if not (args or kwargs) else _Bound(self.base, args, kwargs)
        if self.merged:
            if self.composition == "average" and len(names) > 1:
                raise RuntimeError("merged adapters cannot be averaged; unmerge(model) first")
            names = tuple(n for n in names if n not in self.merged)
        if not names:
            return base(x)
        if self.composition == "average" and len(names) > 1:
            # Each adapter alone around the base, then the mean: (n, *out) -> out
            return torch.stack([self.adapters[n](x, base) for n in names]).mean(0)
        for name in names[:-1]:
            base = _Chain(self.adapters[name], base, self.base)
        return self.adapters[names[-1]](x, base)

    def __getattr__(self, name: str) -> Any:
        # Model code sometimes reads attributes of the layer it owns (``proj.weight.dtype``,
        # ``embed.num_embeddings``): answer for the base module.
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules", {})
            # Never a protocol name: copy.deepcopy would take a base's __deepcopy__ and copy the base only.
            if name == "base" or "base" not in modules or (name.startswith("__") and name.endswith("__")):
                raise
            return getattr(modules["base"], name)

    def extra_repr(self) -> str:
        merged = f", merged={self.merged}" if self.merged else ""
        how = f", composition={self.composition!r}" if self.composition != "stack" else ""
        return f"active={list(self.active)}{merged}{how}"


def walk(model: nn.Module) -> Iterator[tuple[str, nn.Module, nn.Module]]:
    """Yield ``(logical name, module as found, logical module)`` for every module once.

    The logical tree is the model as if no adapter were attached: an AdaptedLayer stands where
    its base stood (its ``base.`` level and its ``adapters`` are not part of the name), and the
    base's own children stay visible, so a module inside an adapted parent can be adapted too.
    """
    seen: set[int] = set()
    stack: list[tuple[str, nn.Module]] = [("", model)]
    while stack:
        name, module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        logical = module.base if isinstance(module, AdaptedLayer) else module
        yield name, module, logical
        children = list(logical.named_children())
        for child_name, child in reversed(children):
            stack.append((f"{name}.{child_name}" if name else child_name, child))


def logical_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``named_modules`` as if no adapter were attached: an AdaptedLayer shows as its base."""
    for name, _, logical in walk(model):
        yield name, logical


def logical_get(model: nn.Module, name: str) -> nn.Module:
    """The module at logical ``name`` as found in the tree (an AdaptedLayer where one is attached)."""
    module = model
    for part in name.split(".") if name else []:
        parent = module.base if isinstance(module, AdaptedLayer) else module
        module = parent._modules[part]
    return module
