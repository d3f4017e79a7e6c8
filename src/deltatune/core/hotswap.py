"""Hot swap: replace an attached adapter's weights, in place, with those of a saved adapter.

Why in place: ``torch.compile`` guards on the module structure, on tensor shapes and on Python
constants such as a scaling factor. Copying the new values into the existing tensors keeps all
three, so a compiled model serves the new adapter without recompiling.

- Same hyperparameters (same method and config apart from targets): the tensors are copied.
- Low-rank adapters (:class:`~deltatune.core.routing.LowRank`) may differ in rank and scaling:
  the new update ``s'·B'A'`` is written as ``s·(B's'/s)A'`` into the existing rank-r tensors,
  zero-padded when ``r' < r``. To accept larger ranks later, attach the slot with a larger rank
  in the first place (e.g. ``rank=64``) and hot swap the real adapter into it. A module that the
  slot adapts but the new adapter does not gets a zero update.
- Everything is checked (targets, tensor keys and shapes, ranks) before the first copy, so a
  failed swap leaves the model unchanged.

The adapter keeps its name and config; only values change. Saving it afterwards writes an
adapter in the slot's layout with the same outputs as the one swapped in.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from deltatune.config import AdapterConfig, HybridConfig
from deltatune.core.inject import _known, adapted_layers, configs
from deltatune.core.io import WEIGHTS_FILE, read_adapter_config, read_tensors
from deltatune.core.layer import AdaptedLayer, FullCopy
from deltatune.core.routing import is_low_rank


def _hyperparameters(config: AdapterConfig) -> AdapterConfig:
    """The config without its targeting fields: what decides how tensors are read."""
    return dataclasses.replace(config, target=None, exclude=(), layers=None, modules_to_save=())


def _fresh(module_name: str, layer: AdaptedLayer, config: AdapterConfig, is_head: bool,
           tensors: dict[str, Tensor], where: str) -> nn.Module:
    """Build the saved adapter's module for ``module_name`` and load its tensors (checked)."""
    fresh = FullCopy(layer.base) if is_head else config.build(module_name, layer.base)
    if fresh is None:
        raise ValueError(f"{where}: {config.method} cannot adapt {module_name!r} ({type(layer.base).__name__})")
    own: dict[str, Tensor] = {}
    for key, expected in fresh.state_dict().items():
        saved = tensors.pop(f"{module_name}.{key}", None)
        if saved is None:
            raise ValueError(f"{where}: tensor {module_name}.{key} is missing from {WEIGHTS_FILE}")
        if saved.shape != expected.shape:
            raise ValueError(f"{where}: tensor {module_name}.{key} has shape {tuple(saved.shape)}, this model "
                             f"needs {tuple(expected.shape)}; the adapter was trained on a different base model")
        own[key] = saved
    fresh.load_state_dict(own)
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


def hotswap_adapter(model: nn.Module, directory: str | os.PathLike[str], name: str) -> None:
    """Overwrite adapter ``name``'s weights, in place, with the adapter saved in ``directory``."""
    _known(model, name)
    where = str(directory)
    meta = read_adapter_config(directory)
    from deltatune.methods import config_from_dict

    new_config, old_config = config_from_dict(meta["config"]), configs(model)[name]
    if isinstance(new_config, HybridConfig) or isinstance(old_config, HybridConfig):
        raise ValueError("hot swap supports single-method adapters; detach the hybrid and load the new one")
    layers = {n: layer for n, layer in adapted_layers(model) if name in layer.adapters}
    for module_name, layer in layers.items():
        if name in layer.merged:
            raise ValueError(f"adapter {name!r} is merged into {module_name!r}; unmerge(model) before hot swapping")
    targets, heads = list(meta["targets"]), list(meta.get("modules_to_save", []))
    for module_name in targets + heads:
        if module_name not in layers:
            raise ValueError(f"{where} adapts {module_name!r}, which adapter {name!r} does not; hot swap "
                             "needs the new targets to be among the slot's (attach a slot covering them)")
    tensors = read_tensors(Path(directory) / WEIGHTS_FILE)
    same = type(new_config) is type(old_config) and _hyperparameters(new_config) == _hyperparameters(old_config)
    staged: dict[str, nn.Module] = {}
    for module_name, layer in layers.items():
        fresh = None
        if module_name in targets or module_name in heads:
            fresh = _fresh(module_name, layer, new_config, module_name in heads, tensors, where)
        staged[module_name] = _staged(name, module_name, layer.adapters[name], fresh, same)
    if tensors:
        raise ValueError(f"{where}: unexpected tensor {next(iter(tensors))!r} in {WEIGHTS_FILE}")
    with torch.no_grad():
        for module_name, new in staged.items():
            values = new.state_dict()
            for key, tensor in layers[module_name].adapters[name].state_dict(keep_vars=True).items():
                tensor.copy_(values[key])
