"""Which attached adapters apply, which train, and what they add to a training step.

Activity is read from and written to the layers (``AdaptedLayer.active``), never kept elsewhere;
the adapters themselves are known from their records (``core/records.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

from torch import nn

from deltatune.core.records import adapted_layers, configs, known


def active_adapters(model: nn.Module) -> tuple[str, ...]:
    """The active adapter names (the union over layers, in attach order)."""
    seen: dict[str, None] = {}
    for _, layer in adapted_layers(model):
        seen.update(dict.fromkeys(layer.active))
    return tuple(n for n in configs(model) if n in seen)


def set_active(model: nn.Module, names: str | Iterable[str], *, trainable: bool = True) -> None:
    """Make ``names`` the active adapters, applied in that order; with ``trainable``, only they train."""
    names = (names,) if isinstance(names, str) else tuple(names)
    for n in names:
        known(model, n)
    for _, layer in adapted_layers(model):
        layer.active = tuple(n for n in names if n in layer.adapters)
    if trainable:
        mark_trainable(model, names)


@contextlib.contextmanager
def using(model: nn.Module, names: str | Iterable[str]) -> Iterator[nn.Module]:
    """Run with ``names`` active, restoring the previous choice afterwards (even on error)."""
    saved = {id(layer): layer.active for _, layer in adapted_layers(model)}
    try:
        set_active(model, names, trainable=False)
        yield model
    finally:
        for _, layer in adapted_layers(model):
            layer.active = saved.get(id(layer), ())


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the bare base model: no adapter applies inside the block."""
    merged = [(n, layer.merged) for n, layer in adapted_layers(model) if layer.merged]
    if merged:
        raise RuntimeError(
            f"adapters {merged[0][1]} are merged into {merged[0][0]!r}; call unmerge(model) before disabling them"
        )
    with using(model, ()):
        yield model


def mark_trainable(model: nn.Module, names: Iterable[str] | None = None) -> None:
    """Freeze everything, then unfreeze the parameters of adapters ``names`` (default: the active ones)."""
    keep = set(active_adapters(model) if names is None else names)
    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in adapted_layers(model):
        for n in keep & set(layer.adapters.keys()):
            for p in layer.adapters[n].parameters():
                p.requires_grad_(True)


def on_train_step(model: nn.Module, step: int, total_steps: int) -> None:
    """Let every attached adapter react to an optimizer step (call it after ``optimizer.step()``)."""
    for name, config in list(configs(model).items()):
        config.on_step(model, name, step, total_steps)


def regularization_loss(model: nn.Module) -> Any:
    """The sum of the attached adapters' extra loss terms, or None if none has one.

    Training loops add it to the task loss before ``backward()``:
    ``loss = task_loss + reg if (reg := regularization_loss(model)) is not None else task_loss``.
    """
    terms = [t for name, config in configs(model).items() if (t := config.regularization(model, name)) is not None]
    return sum(terms[1:], terms[0]) if terms else None
