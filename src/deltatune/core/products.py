"""Matrix products for adapter kernels, on the fastest CPU engine, and when a kernel may use them.

Method kernels (``methods/*_kernels.py``) and the mixed-batch path compute a frozen layer from its
weight instead of calling it. They take their products from here, so one switch chooses the CPU
engine for all of them: ``set_cpu_engine`` / ``cpu_engine`` (also ``deltatune.set_cpu_engine``
and ``cpu_engine:`` in a training config).

- ``linear(x, W, b)``: the layer's own product ``x Wᵀ + b``; ``mm(a, b)``: a 2-D product of the same
  size class (input gradients); ``thin_mm`` and ``project_t``: products with a rank-r side.
- ``runs_like_its_weight(module)``: whether computing the module from its weight equals calling
  it (a frozen weight and no hooks, so nothing a hook would do is skipped).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_ENGINE = "auto"              # matrix-product engine on CPU for float32: "auto", "aten", "thin" or "onednn"
_ENGINES = ("auto", "aten", "thin", "onednn")
_AUTO: str | None = None      # what "auto" stands for on this CPU, read once
_ONEDNN_WORKS: bool | None = None
_ONEDNN_MIN_WORK = 1 << 23  # multiply-adds; below, oneDNN's per-call setup (~0.2 ms) outweighs its speed


def set_cpu_engine(name: str) -> str:
    """Choose how the fused kernels multiply float32 matrices on CPU; returns the previous choice.

    ``"auto"`` (default) is ``"onednn"`` on AMD CPUs and ``"aten"`` on every other one (``auto_engine``).
    ``"onednn"`` runs every product of an adapted layer on oneDNN's linear (a private torch op,
    probed before first use, with aten as fallback). On an AMD EPYC, where MKL takes slower code
    paths, that makes the layer's float32 products 1.4-2x faster (a MiniLM rank-8 training step fell
    from 0.78x to 0.50x of full fine-tuning; bench/README.md); on an Intel Xeon, where MKL is at
    home, oneDNN's products were 10-25 % slower. The price: an adapted layer's output differs from
    the wrapped ``nn.Linear``'s by float32 rounding (about 1e-7 relative), also while the adapter is
    still the identity.
    ``"thin"`` moves only the adapter's rank-r products to oneDNN and leaves the base layer's own
    product on aten, so the base output stays bit-identical to ``nn.Linear``'s.
    ``"aten"`` uses torch's own products (MKL on x86) throughout.
    Compiled graphs, other devices and dtypes always use aten; so do products of fewer than
    ``_ONEDNN_MIN_WORK`` multiply-adds, where oneDNN's per-call setup outweighs its speed.
    """
    global _ENGINE
    if name not in _ENGINES:
        raise ValueError(f"cpu engine must be 'auto', 'aten', 'thin' or 'onednn', got {name!r}")
    previous, _ENGINE = _ENGINE, name
    return previous


@contextlib.contextmanager
def cpu_engine(name: str) -> Iterator[None]:
    """``with cpu_engine("onednn"): ...`` runs the block with that engine, then restores the old one."""
    previous = set_cpu_engine(name)
    try:
        yield
    finally:
        set_cpu_engine(previous)


def _use_onednn(a: Tensor, b: Tensor, out_features: int, thin: bool = False) -> bool:
    """Whether ``a`` (…, k) times a (k, out_features) matrix ``b`` (either layout) runs on oneDNN."""
    global _ONEDNN_WORKS
    if torch.compiler.is_compiling():  # first: a compiled graph takes aten, and tracing auto_engine() would break it
        return False
    engine = auto_engine() if _ENGINE == "auto" else _ENGINE
    if engine == "aten" or (engine == "thin" and not thin):
        return False
    if a.device.type != "cpu" or a.dtype != torch.float32 or b.dtype != torch.float32:
        return False
    if a.numel() * out_features < _ONEDNN_MIN_WORK:
        return False
    if _ONEDNN_WORKS is None:
        try:
            probe = torch.ops.mkldnn._linear_pointwise(torch.ones(2, 3), torch.ones(4, 3), None, "none", [], "")
            _ONEDNN_WORKS = bool(torch.backends.mkldnn.is_available() and torch.equal(probe, torch.full((2, 4), 3.0)))
        except (AttributeError, RuntimeError, NotImplementedError, TypeError):
            _ONEDNN_WORKS = False
    return _ONEDNN_WORKS


def onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)`` for the base layer's product, on the chosen engine."""
    if _use_onednn(x, weight, weight.shape[0]):
        return onednn_linear(x, weight, bias)
    return F.linear(x, weight, bias)


def mm(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` (2-D) for the base layer's product, on the chosen engine."""
    return onednn_linear(a, b.t()) if _use_onednn(a, b, b.shape[1]) else a @ b


def thin_mm(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` for a rank-r product: a is (r, N), b is (N, d)."""
    return onednn_linear(a, b.t()) if _use_onednn(a, b, b.shape[1], thin=True) else a @ b


def project_t(x: Tensor, A: Tensor) -> Tensor:
    """``(x Aᵀ)ᵀ``, (r, N), for x (N, d) and A (r, d). In float32 MKL is fastest asked for ``A xᵀ``; in
    bf16/fp16 ``x Aᵀ`` (an (N, r) result, returned transposed) runs about 1.4x faster, and the products
    that read it afterwards (the rank-r update of the output and the factors' gradients) are as
    fast or faster with the (N, r) layout."""
    if _use_onednn(x, A, A.shape[0], thin=True):
        return onednn_linear(x, A).t()
    if x.dtype in (torch.bfloat16, torch.float16) and x.device.type == "cpu":
        return (x @ A.t()).t()
    return A @ x.t()


def current_engine() -> str:
    """The CPU engine chosen: ``"auto"``, ``"onednn"``, ``"thin"`` or ``"aten"``."""
    return _ENGINE


def auto_engine() -> str:
    """What ``"auto"`` runs on this machine: ``"onednn"`` on an AMD CPU (``vendor_id`` in
    ``/proc/cpuinfo``: ``AuthenticAMD``), where torch's MKL products are the slower ones, else ``"aten"``."""
    global _AUTO
    if _AUTO is None:
        _AUTO = "onednn" if _cpu_vendor() == "AuthenticAMD" else "aten"
    return _AUTO


def _cpu_vendor() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # not Linux: no oneDNN advantage known there
        pass
    return ""


def plain_linear(module: Any) -> bool:
    """An ``nn.Linear`` (not a subclass with its own forward) that runs like its weight."""
    return runs_like_its_weight(module) and type(module).forward is nn.Linear.forward


def runs_like_its_weight(base: Any) -> bool:
    """Whether a kernel may compute ``base`` from its weight instead of calling it: a module with a
    frozen floating-point weight and no hooks (stacked adapters, accelerate's offloading and other
    hooked layers are called, so their hooks run). Callers also check the module's type."""
    if not isinstance(base, torch.nn.Module):
        return False
    if base._forward_hooks or base._forward_pre_hooks or base._backward_hooks or base._backward_pre_hooks:
        return False
    weight = getattr(base, "weight", None)
    return isinstance(weight, Tensor) and weight.is_floating_point() and not weight.requires_grad
