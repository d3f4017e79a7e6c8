"""Training checkpoints: trainable tensors, method state, optimizer state, RNG state and the step, never pickled.

A checkpoint is a directory with ``state.safetensors`` (every tensor: ``param/`` the trainable
parameters, ``state/`` what the strategy needs besides them, e.g. an adapter's buffers and
training state (see strategy.py), ``optim/`` the optimizer's moment buffers, ``rng/`` torch's RNG
state as uint8) and ``state.json`` (every scalar: the step, the optimizer's hyperparameters, the
loss history).

Checkpoints are versioned, ``checkpoint/step-000000012/``, so there is never a moment without a
complete one: a new checkpoint is written to a temporary sibling, made durable, renamed to its
final name (a name that did not exist, so the rename is atomic everywhere), and only then are the
older ones removed. Every ``step-*`` directory is therefore complete, and resuming takes the
newest; a process killed at any instant leaves at most a temporary directory (removed by the next
checkpoint or start) and one checkpoint too many.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from deltatune.core.files import crash_point, fsync_dir, remove_leftovers, seal_tree, temp_dir

TENSORS = "state.safetensors"
SCALARS = "state.json"
_STEP = re.compile(r"^step-(\d+)$")


def save_checkpoint(directory: Path, params: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer,
                    scalars: dict[str, Any], state: dict[str, torch.Tensor] | None = None) -> None:
    """Write everything needed to continue training from this exact point."""
    tensors = _tensors(params, optimizer, state or {})
    meta = {"param_groups": optimizer.state_dict()["param_groups"], **scalars}
    directory.mkdir(parents=True, exist_ok=True)
    remove_leftovers(directory)
    final = directory / f"step-{scalars['step']:09d}"
    tmp = temp_dir(final)
    try:
        save_file(tensors, str(tmp / TENSORS))
        crash_point("checkpoint-write")
        (tmp / SCALARS).write_text(json.dumps(meta, indent=1) + "\n")
        seal_tree(tmp)
        crash_point("checkpoint-publish")
        if not final.exists():  # it can exist only from this same run at this same step: identical
            tmp.rename(final)
            fsync_dir(directory)
        crash_point("checkpoint-swap")
        for older in checkpoints(directory):
            if older != final:
                remove_checkpoint(older)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _tensors(params: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer,
             state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    tensors = {f"param/{name}": p for name, p in params.items()}
    for index, slots in optimizer.state_dict()["state"].items():
        tensors.update({f"optim/{index}/{key}": v for key, v in slots.items() if isinstance(v, torch.Tensor)})
    tensors = {k: t.detach().cpu().contiguous() for k, t in tensors.items()}
    # Copies: state may hold the parameters again (an adapter's state_dict), and safetensors refuses shared memory.
    tensors.update({f"state/{name}": t.detach().to("cpu", copy=True).contiguous() for name, t in state.items()})
    tensors["rng/cpu"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = s
    return tensors


def checkpoints(directory: Path) -> list[Path]:
    """The complete checkpoints in ``directory``, oldest first (a pre-versioning one counts as step -1)."""
    if not directory.is_dir():
        return []
    found = sorted((int(m[1]), p) for p in directory.iterdir() if (m := _STEP.match(p.name)) and p.is_dir())
    legacy = [directory] if (directory / SCALARS).is_file() and (directory / TENSORS).is_file() else []
    return legacy + [p for _, p in found]


def latest_checkpoint(directory: Path) -> Path | None:
    """The newest complete checkpoint in ``directory``, or None."""
    found = checkpoints(directory)
    return found[-1] if found else None


def remove_checkpoint(checkpoint: Path) -> None:
    if _STEP.match(checkpoint.name):
        shutil.rmtree(checkpoint, ignore_errors=True)
    else:  # a checkpoint written before versioning: its two files only
        for name in (SCALARS, TENSORS):
            (checkpoint / name).unlink(missing_ok=True)


def load_checkpoint_step(directory: Path) -> int | None:
    """The step of the newest checkpoint in ``directory`` (None if there is none)."""
    newest = latest_checkpoint(directory)
    if newest is None:
        return None
    try:
        return int(json.loads((newest / SCALARS).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_checkpoint(directory: Path, params: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer
                    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Restore parameters, optimizer and RNG from the newest checkpoint in ``directory``; return the
    saved scalars and the saved ``state`` tensors (for the strategy to restore)."""
    newest = latest_checkpoint(directory)
    if newest is None:
        raise ValueError(f"no checkpoint in {directory}; run without --resume to start afresh")
    meta = json.loads((newest / SCALARS).read_text())
    tensors = load_file(str(newest / TENSORS))
    saved = {k.removeprefix("param/") for k in tensors if k.startswith("param/")}
    if saved != set(params):
        extra = sorted(saved ^ set(params))[0]
        raise ValueError(f"checkpoint in {newest} does not match this model's trainable parameters "
                         f"(e.g. {extra!r}); was the config changed?")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[f"param/{name}"])
    optim: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            _, index, slot = key.split("/", 2)
            optim.setdefault(int(index), {})[slot] = value
    optimizer.load_state_dict({"state": optim, "param_groups": meta.pop("param_groups")})
    _restore_rng(tensors)
    return meta, {k.removeprefix("state/"): t for k, t in tensors.items() if k.startswith("state/")}


def _restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng/cpu"])
    cuda = sorted((k for k in tensors if k.startswith("rng/cuda/")), key=lambda k: int(k.rsplit("/", 1)[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
