"""Training checkpoints: trainable tensors, optimizer state, RNG state and the step, never pickled.

A checkpoint is a directory with ``state.safetensors`` (every tensor: the trainable parameters,
the optimizer's moment buffers, torch's RNG state as uint8) and ``state.json`` (every scalar: the
step, the optimizer's hyperparameters, the loss history). It replaces the previous checkpoint
atomically, so a crash mid-write leaves the last good one in place.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from deltatune.core.io import atomic_directory

TENSORS = "state.safetensors"
SCALARS = "state.json"


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scalars: dict[str, Any]) -> None:
    """Write everything needed to continue training from this exact point."""
    tensors: dict[str, torch.Tensor] = {}
    for name, p in trainable(model).items():
        tensors[f"param/{name}"] = p.detach().cpu().contiguous()
    state = optimizer.state_dict()
    for index, slots in state["state"].items():
        for key, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim/{index}/{key}"] = value.detach().cpu().contiguous()
    tensors["rng/cpu"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = s
    meta = {"param_groups": state["param_groups"], **scalars}
    with atomic_directory(directory) as tmp:
        save_file(tensors, str(tmp / TENSORS))
        (tmp / SCALARS).write_text(json.dumps(meta, indent=1) + "\n")


def load_checkpoint_step(directory: Path) -> int | None:
    """The step of the checkpoint in ``directory`` (None if there is none)."""
    try:
        return int(json.loads((directory / SCALARS).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_checkpoint(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore parameters, optimizer and RNG from ``directory``; return the saved scalars."""
    if not (directory / SCALARS).is_file():
        raise ValueError(f"no checkpoint in {directory}; run without --resume to start afresh")
    meta = json.loads((directory / SCALARS).read_text())
    tensors = load_file(str(directory / TENSORS))
    params = trainable(model)
    saved = {k.removeprefix("param/") for k in tensors if k.startswith("param/")}
    if saved != set(params):
        extra = sorted(saved ^ set(params))[0]
        raise ValueError(f"checkpoint in {directory} does not match this model's trainable parameters "
                         f"(e.g. {extra!r}); was the config changed?")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[f"param/{name}"])
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            _, index, slot = key.split("/", 2)
            state.setdefault(int(index), {})[slot] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta.pop("param_groups")})
    torch.set_rng_state(tensors["rng/cpu"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng/cuda/")), key=lambda k: int(k.rsplit("/", 1)[1]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    return meta
