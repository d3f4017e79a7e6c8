"""The adapter contract and the named capabilities the core asks for.

An adapter is an ``nn.Module`` whose forward receives the input and the base layer::

    adapter(x, base) -> Tensor          # base(x) runs the frozen layer

(:class:`Adapter` is the base class methods subclass.) Everything else an adapter or a config
can do is one of the capability Protocols below. The core asks ``isinstance(x, Capability)``;
it never looks an attribute up by name and never asks which method built ``x``.

=========================  =============================  =============================================
capability                 who has it                     what the core does with it
=========================  =============================  =============================================
:class:`Mergeable`         adapters: ``delta_weight``     merge / unmerge as ``W ± ΔW`` (core/merge.py)
:class:`LowRank`           adapters: factors (A, B, s)    batched mixed-adapter batches (core/routing.py),
                                                          hot swap across ranks, weighted combination
:class:`VirtualTokens`     adapters: N token embeddings   prepended to the input (integrations/)
:class:`KeyValuePrefix`    adapters: per-layer K/V        prepended to the attention cache (integrations/)
:class:`Reparameterized`   adapters: ``materialized()``   ``drop_reparameterization`` swaps in the result
:class:`ReparameterizedConfig`  configs                   the same, for the saved config
:class:`LowRankConfig`     configs: ``low_rank_config``   the home of a combination (core/combine.py)
:class:`TrainingState`     adapters: state kept outside   training checkpoints save and restore it
                           ``state_dict`` (e.g. averages)  (train/strategy.py), so resuming is exact
=========================  =============================  =============================================
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from deltatune.config import AdapterConfig


@runtime_checkable
class TrainingState(Protocol):
    """An adapter that keeps state which training changes but ``state_dict`` does not hold (e.g.
    running averages that matter only while training): a checkpoint saves and restores it."""

    def training_state(self) -> dict[str, Tensor]:
        """The state as tensors by key (empty when there is none yet)."""
        ...

    def load_training_state(self, state: dict[str, Tensor]) -> None:
        """Restore what :meth:`training_state` returned (an empty dict: no state)."""
        ...


@runtime_checkable
class Mergeable(Protocol):
    """An adapter whose update folds into the base weights as ``W + delta_weight(base)``."""

    def delta_weight(self, base: nn.Module) -> Tensor:
        """ΔW in the base weight's own layout (e.g. (d_in, d_out) for GPT-2's ``Conv1D``)."""
        ...


class Adapter(nn.Module):
    """Base class for adapter modules.

    Subclasses implement ``forward(x, base)``. Methods whose update can be folded into the base
    weights also implement ``delta_weight(base)`` (:class:`Mergeable`); merging, unmerging and
    weighted combination are then written once, in ``core/merge.py``. A method whose delta
    depends on the base weight itself, or that merges by other means, overrides ``merge_into`` /
    ``unmerge_from``.
    """

    #: Largest absolute difference between merged and unmerged outputs the method promises (float32).
    merge_atol: ClassVar[float] = 1e-5

    def forward(self, x: Tensor, base: Any) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def mergeable(self) -> bool:
        return isinstance(self, Mergeable) or type(self).merge_into is not Adapter.merge_into

    @torch.no_grad()
    def merge_into(self, base: nn.Module) -> None:
        weight = base.weight
        weight.add_(self._delta(base).to(weight.dtype))

    @torch.no_grad()
    def unmerge_from(self, base: nn.Module) -> None:
        weight = base.weight
        weight.sub_(self._delta(base).to(weight.dtype))

    def _delta(self, base: nn.Module) -> Tensor:
        if not isinstance(self, Mergeable):
            raise NotImplementedError(f"{type(self).__name__} cannot be merged into the base weights")
        return self.delta_weight(base)


@runtime_checkable
class LowRank(Protocol):
    """Capability of adapters whose forward is ``base(x) + s · (x Aᵀ) Bᵀ`` (the plain low-rank methods).

    It unlocks the batched mixed-batch path, hot swapping across ranks and scalings, and
    weighted combination (``core/combine.py``); the core never asks which method it is.
    """

    def low_rank_factors(self) -> tuple[Tensor, Tensor, float]:
        """``(A (k, d_in), B (d_out, k), s)`` as used in forward (dropout aside)."""
        ...

    def load_low_rank(self, A: Tensor, B: Tensor, scaling: float) -> None:
        """Set the update to ``scaling · B A`` in place, keeping tensor shapes (zero-pad the rank);
        ``ValueError`` if the rank does not fit."""
        ...


_LOW_RANK_TYPES: dict[type, bool] = {}


def is_low_rank(adapter: nn.Module) -> bool:
    """Whether ``adapter`` has the :class:`LowRank` capability (cached per type: this runs per layer)."""
    cls = type(adapter)
    if cls not in _LOW_RANK_TYPES:
        _LOW_RANK_TYPES[cls] = isinstance(adapter, LowRank)
    return _LOW_RANK_TYPES[cls]


@runtime_checkable
class VirtualTokens(Protocol):
    """An adapter that feeds N virtual token embeddings before the input (on the input embedding)."""

    @property
    def num_virtual_tokens(self) -> int: ...

    def virtual_tokens(self) -> Tensor:
        """The token embeddings, (N, d)."""
        ...


@runtime_checkable
class KeyValuePrefix(Protocol):
    """An adapter that feeds every attention layer N extra key/value positions."""

    @property
    def num_virtual_tokens(self) -> int: ...

    def key_values(self) -> Tensor:
        """``(L, 2, H, N, D)``: per layer, the keys then the values, in the cache's layout."""
        ...


@runtime_checkable
class Reparameterized(Protocol):
    """An adapter trained through a reparameterisation (an encoder, an MLP) that can be replaced by
    the plain tensors it produces, with the same outputs."""

    def materialized(self) -> nn.Module:
        """The plain adapter (or ``self`` when there is nothing to drop)."""
        ...


@runtime_checkable
class ReparameterizedConfig(Protocol):
    """A config whose adapters may be :class:`Reparameterized`; ``materialized()`` is the config
    of the plain adapter."""

    @property
    def reparameterized(self) -> bool: ...

    def materialized(self) -> AdapterConfig: ...


@runtime_checkable
class LowRankConfig(Protocol):
    """A config that can describe a plain :class:`LowRank` adapter of a given rank on its layers
    (scaling 1): where a weighted combination of its adapters lives."""

    def low_rank_config(self, rank: int) -> AdapterConfig: ...
