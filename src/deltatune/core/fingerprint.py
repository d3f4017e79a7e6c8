"""A cheap fingerprint of the base weights an adapter was trained on.

Saved in our format's ``adapter_config.json`` (``base_fingerprint``) and compared on load: loading
onto a base whose adapted modules have the same shapes but other weights (another checkpoint of
the same architecture) works, but gives outputs the trained run never saw, so it warns, naming the
modules that differ. Files without a fingerprint (older saves) load silently.

The fingerprint is every adapted module's weight shape plus, for up to :data:`SAMPLED` of them
(evenly spaced), a hash of the first :data:`VALUES` weight values rounded to bfloat16, so a base
loaded in float32, bfloat16 or on another device gives the same hash. Cost: a few kilobytes read.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn

SAMPLED = 8
VALUES = 256


def _weight(module: nn.Module) -> torch.Tensor | None:
    """The module's plain floating-point weight; None for none, a quantized one, or a tensor
    subclass such as FSDP's sharded DTensor (reading it whole would be a collective)."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or type(weight.detach()) is not torch.Tensor:
        return None
    return weight if weight.is_floating_point() else None


def _hash(weight: torch.Tensor) -> str:
    sample = weight.detach().reshape(-1)[:VALUES].to("cpu", torch.bfloat16).view(torch.int16)  # (<=VALUES,)
    return hashlib.sha256(sample.numpy().tobytes()).hexdigest()[:16]


def fingerprint(bases: dict[str, nn.Module]) -> dict[str, Any]:
    """``{"shapes": {module: shape}, "hashes": {module: hex}}`` for the base modules by name."""
    weights = {name: w for name, m in sorted(bases.items()) if (w := _weight(m)) is not None}
    names = list(weights)
    step = max(1, len(names) // SAMPLED)
    return {"shapes": {n: list(w.shape) for n, w in weights.items()},
            "hashes": {n: _hash(weights[n]) for n in names[::step][:SAMPLED]}}


def differences(saved: Any, bases: dict[str, nn.Module]) -> list[str]:
    """What differs between a saved fingerprint and ``bases`` now (empty: the same, or nothing saved)."""
    if not isinstance(saved, dict):
        return []
    out = []
    for name, shape in (saved.get("shapes") or {}).items():
        weight = _weight(bases[name]) if name in bases else None
        if weight is not None and list(weight.shape) != list(shape):
            out.append(f"{name!r} has weight shape {tuple(weight.shape)}, saved with {tuple(shape)}")
    for name, digest in (saved.get("hashes") or {}).items():
        weight = _weight(bases[name]) if name in bases else None
        if weight is not None and _hash(weight) != digest:
            out.append(f"the weights of {name!r} differ")
    return out
