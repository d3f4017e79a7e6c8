"""What the quantized-base benches share (bench/quant.py on the CPU, bench/quant_device.py on any
device): the workloads at the issue's sizes, the resident bytes of a frozen model and of its linear
layers, and the versions of the libraries involved."""

from __future__ import annotations

import dataclasses
from importlib.metadata import PackageNotFoundError, version

from torch import nn

import deltatune as dt
from bench.workloads import WORKLOADS, Workload
from deltatune.core.layers import describe
from deltatune.integrations.quantize import DEFAULT_SKIP, resident_bytes


def workload(name: str, quick: bool) -> Workload:
    """``minilm`` (batch 32 x 128) or ``smollm2`` (batch 1 x 256, the issue's goal); ``quick``: the
    tiny random BERT / Llama of the same kinds."""
    w = WORKLOADS[("tiny-" if quick else "") + ("bert" if name == "minilm" and quick else
                                                "llama" if quick else name)]
    if name == "smollm2" and not quick:
        w = dataclasses.replace(w, batch=1, length=256)
    return w


def linear_bytes(model: nn.Module) -> int:
    """Resident bytes of the quantizable linear layers (all but the head), quantized or not."""
    total = 0
    for name, m in model.named_modules():
        spec = describe(m)
        if spec is not None and spec.kind == "linear" and not any(name.endswith(s) for s in DEFAULT_SKIP) \
                and ".adapters." not in name and not isinstance(m, dt.AdaptedLayer):
            total += resident_bytes(m)
    return total


def frozen_bytes(model: nn.Module) -> int:
    """Resident bytes of the frozen model: everything but the adapter's (and PEFT's) own tensors."""
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return resident_bytes(model) - trainable


def versions() -> dict[str, str]:
    out = {}
    for pkg in ("bitsandbytes", "torchao", "transformers", "peft"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out
