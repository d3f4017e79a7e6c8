"""How several adapters active at once on a layer combine: stacked in order, or averaged.

``set_composition`` sets it for every adapted layer; ``composed`` runs a block with chosen adapters
active and combined one way, and restores both afterwards. The combining itself is
:meth:`deltatune.core.layer.AdaptedLayer.forward`'s.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from torch import nn

from deltatune.core.active import using
from deltatune.core.records import adapted_layers

COMPOSITIONS = ("stack", "average")


def set_composition(model: nn.Module, how: str) -> None:
    """How several active adapters combine on a layer: ``stack`` (in order, the default) or
    ``average`` (mean of the outputs of each adapter applied alone; adapters absent from a layer
    take no part in its mean)."""
    if how not in COMPOSITIONS:
        raise ValueError(f"composition must be one of {', '.join(COMPOSITIONS)}; got {how!r}")
    for _, layer in adapted_layers(model):
        layer.composition = how


@contextlib.contextmanager
def composed(model: nn.Module, names: Sequence[str], how: str = "average") -> Iterator[nn.Module]:
    """Run with ``names`` active and combined as ``how``; restores both afterwards."""
    if how not in COMPOSITIONS:
        raise ValueError(f"composition must be one of {', '.join(COMPOSITIONS)}; got {how!r}")
    saved = [(layer, layer.composition) for _, layer in adapted_layers(model)]
    try:
        set_composition(model, how)
        with using(model, names):
            yield model
    finally:
        for layer, how_before in saved:
            layer.composition = how_before
