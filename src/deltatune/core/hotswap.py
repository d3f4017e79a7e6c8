"""Hot swap: replace an attached adapter's weights, in place, with those of a saved adapter.

Why in place: ``torch.compile`` guards on the module structure, on tensor shapes and on Python
constants such as a scaling factor. Copying the new values into the existing tensors keeps all
three, so a compiled model serves the new adapter without recompiling.

- Same hyperparameters (same method and config apart from targets): the tensors are copied.
- Low-rank adapters (:class:`~deltatune.core.contract.LowRank`) may differ in rank and scaling:
  the new update ``s'·B'A'`` is written as ``s·(B's'/s)A'`` into the existing rank-r tensors,
  zero-padded when ``r' < r``. To accept larger ranks later, attach the slot with a larger rank
  in the first place (e.g. ``rank=64``) and hot swap the real adapter into it. A module that the
  slot adapts but the new adapter does not gets a zero update.
- Everything is checked (targets, tensor keys and shapes, ranks) before the first copy, so a
  failed swap leaves the model unchanged.

The adapter keeps its name and config; only values change. Saving it afterwards writes an
adapter in the slot's layout with the same outputs as the one swapped in.

This module takes a :class:`~deltatune.core.stored.StoredAdapter` (any format's, read by
``deltatune.formats.hotswap_adapter``) and checks its tensors with the same
:func:`~deltatune.core.stored.check_tensors` as ``install``, against the modules the new config
builds on the slot's bases.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

from deltatune.config import AdapterConfig
from deltatune.core.records import adapted_layers, configs, known
from deltatune.core.layer import AdaptedLayer, FullCopy
from deltatune.core.contract import is_low_rank
from deltatune.core.stored import Source, StoredAdapter, check_tensors


def _hyperparameters(config: AdapterConfig) -> AdapterConfig:
    """The config without its targeting fields: what decides how tensors are read."""
    return dataclasses.replace(config, target=None, exclude=(), layers=None, modules_to_save=())


def _fresh(module_name: str, layer: AdaptedLayer, config: AdapterConfig, is_head: bool, where: str) -> nn.Module:
    """The saved adapter's module for ``module_name``, built on the slot's base (values not loaded yet)."""
    fresh = FullCopy(layer.base) if is_head else config.build(module_name, layer.base)
    if fresh is None:
        raise ValueError(f"{where}: {config.method} cannot adapt {module_name!r} ({type(layer.base).__name__})")
    return fresh


def _staged(name: str, module_name: str, current: nn.Module, fresh: nn.Module | None, same: bool) -> nn.Module:
    """A copy of ``current`` holding the new values (the model itself is not touched yet)."""
    staged = copy.deepcopy(current)
    if fresh is None:  # the slot adapts a module the new adapter leaves alone
        if not is_low_rank(current):
            raise ValueError(f"the new adapter does not adapt {module_name!r}, which {name!r} adapts "
                             f"({type(current).__name__}); hot swap needs the same modules")
        A, B, _ = current.low_rank_factors()
        staged.load_low_rank(A[:0], B[:, :0], 1.0)  # type: ignore[operator]
        return staged
    if isinstance(fresh, FullCopy) != isinstance(current, FullCopy):
        raise ValueError(f"{module_name!r} is a trained-in-full module in one adapter and not in the other")
    shapes_match = {k: v.shape for k, v in fresh.state_dict().items()} == {
        k: v.shape for k, v in current.state_dict().items()}
    if (same or isinstance(current, FullCopy)) and shapes_match:
        staged.load_state_dict(fresh.state_dict())
    elif is_low_rank(current) and is_low_rank(fresh):
        staged.load_low_rank(*fresh.low_rank_factors())  # type: ignore[operator]
    else:
        raise ValueError(
            f"adapter {name!r} on {module_name!r} ({type(current).__name__}) cannot take the new weights: its "
            "hyperparameters differ and it is not low-rank; hot swap adapters with identical configs"
        )
    return staged


def swap_in(model: nn.Module, value: StoredAdapter, name: str) -> None:
    """Overwrite adapter ``name``'s weights, in place, with ``value``'s."""
    known(model, name)
    source = value.source or Source("adapter")
    where = source.where
    if len(value.config.parts) != 1 or len(configs(model)[name].parts) != 1:
        raise ValueError("hot swap supports single-method adapters; detach the hybrid and load the new one")
    new_config, old_config = value.config.parts[0], configs(model)[name].parts[0]
    layers = {n: layer for n, layer in adapted_layers(model) if name in layer.adapters}
    for module_name, layer in layers.items():
        if name in layer.merged:
            raise ValueError(f"adapter {name!r} is merged into {module_name!r}; unmerge(model) before hot swapping")
    targets, heads = value.targets, list(value.modules_to_save)
    for module_name in targets + heads:
        if module_name not in layers:
            raise ValueError(f"{where} adapts {module_name!r}, which adapter {name!r} does not; hot swap "
                             "needs the new targets to be among the slot's (attach a slot covering them)")
    fresh = {m: _fresh(m, layers[m], new_config, m in heads, where) for m in layers if m in targets or m in heads}
    check_tensors({f"{m}.{k}": t.shape for m, module in fresh.items() for k, t in module.state_dict().items()},
                  value.tensors, source)  # the same check as install's, naming the file's key
    for m, module in fresh.items():
        module.load_state_dict({k: value.tensors[f"{m}.{k}"] for k in module.state_dict()})
    same = type(new_config) is type(old_config) and _hyperparameters(new_config) == _hyperparameters(old_config)
    staged = {m: _staged(name, m, layer.adapters[name], fresh.get(m), same) for m, layer in layers.items()}
    with torch.no_grad():
        for module_name, new in staged.items():
            values = new.state_dict()
            for key, tensor in layers[module_name].adapters[name].state_dict(keep_vars=True).items():
                tensor.copy_(values[key])
