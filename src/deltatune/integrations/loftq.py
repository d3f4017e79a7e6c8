"""LoftQ initialisation: quantize the base and initialise LoRA together, so that Q + s·B A ≈ W.

LoftQ (Li et al., ICLR 2024, arXiv:2310.08659). QLoRA starts from Q = quant(W) with B = 0, so the
adapted model starts off by the quantization error W − deq(Q). LoftQ alternates, from A = B = 0::

    Q      = quant(W − s·B A)                  # the base stores what the adapter does not carry
    B, A   = best rank-r factors of (W − deq(Q)) / s   (truncated SVD, √σ on each side)

and the model starts at deq(Q) + s·B A, much closer to W. ``iterations=1`` is one quantization and one
SVD; more alternate further. :func:`loftq` reports the relative approximation error
‖W − (deq(Q) + s·B A)‖_F / ‖W‖_F summed over the adapted layers before (plain quantization, B = 0)
and after.

The base it leaves is Q(W − s·B A), not quant(W): to reload the trained adapter, run
:func:`loftq_quantize` again on the same full-precision model and config (deterministic) and load the
adapter onto it (what ``load_trained`` does for ``loftq_iterations``), or save the quantized base
itself (``integrations.quantize.mark_for_transformers`` + ``save_pretrained``). :func:`loftq` is
:func:`loftq_quantize`, ``attach`` and :func:`apply_loftq_init` in one call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from deltatune.core.inject import attach, detach
from deltatune.core.records import adapted_layers
from deltatune.core.layer import AdaptedLayer
from deltatune.core.layers import quantized_format
from deltatune.integrations.quantize import DEFAULT_SKIP, check_device, quantize, quantized_linear


@dataclass(frozen=True)
class LoftqReport:
    """Relative Frobenius error of the initial model's weights against the full-precision ones,
    ``sqrt(Σ‖W − Ŵ‖²) / sqrt(Σ‖W‖²)`` over the adapted layers: ``before`` is plain quantization
    (QLoRA's start, B = 0), ``after`` LoftQ's deq(Q) + s·B A."""

    layers: int
    before: float
    after: float


def loftq(model: nn.Module, config: Any, fmt: str = "nf4", *, iterations: int = 1, name: str = "default",
          **quantize_kwargs: Any) -> LoftqReport:
    """Attach LoRA ``config`` to the full-precision ``model`` as ``name``, quantize the base to ``fmt``
    with LoftQ's initialisation (see the module docs), and quantize the other linear layers as
    :func:`~deltatune.integrations.quantize.quantize` would. Returns the approximation errors."""
    report, inits = loftq_quantize(model, config, fmt, iterations=iterations, **quantize_kwargs)
    attach(model, config, name)
    apply_loftq_init(model, inits, name)
    return report


def loftq_quantize(model: nn.Module, config: Any, fmt: str = "nf4", *, iterations: int = 1,
                   **quantize_kwargs: Any) -> tuple[LoftqReport, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """The base half of :func:`loftq`: quantize ``model`` (full precision, no adapter) as
    :func:`~deltatune.integrations.quantize.quantize` would, except that each linear layer LoRA
    ``config`` would adapt stores Q = quant(W − s·B A) from LoftQ's alternation. Returns the report
    and each such layer's initial ``(A, B)`` by module name, for :func:`apply_loftq_init` once the
    adapter is attached (``deltatune train`` with ``loftq_iterations``). Deterministic: the same model
    and config give the same Q, which is how a trained adapter is reloaded."""
    if getattr(config, "method", None) != "lora" or getattr(config, "init", "default") not in ("default", "gaussian"):
        raise ValueError("loftq initialises a plain LoRA adapter: pass a LoraConfig (init default), "
                         f"not {type(config).__name__}")
    if iterations < 1:
        raise ValueError(f"loftq iterations must be >= 1, got {iterations}")
    if any(isinstance(m, AdaptedLayer) for m in model.modules()) or any(
            quantized_format(m) is not None for m in model.modules()):
        raise ValueError("loftq needs the full-precision model with no adapter attached: it quantizes the base itself")
    skip = tuple(quantize_kwargs.get("skip", DEFAULT_SKIP))
    qkw = {k: v for k, v in quantize_kwargs.items() if k not in ("skip", "rest_dtype", "device")}
    device = quantize_kwargs.get("device")
    device = None if device is None else check_device(device)
    probe = "_loftq_probe"
    with torch.random.fork_rng(devices=[]):  # the probe's random init leaves the caller's RNG alone
        attach(model, config, probe)  # which layers the adapter takes, with its rank and scaling
    plan = [(n, layer.adapters[probe].rank, layer.adapters[probe].scaling) for n, layer in adapted_layers(model)
            if type(layer.base) is nn.Linear and not any(n == s or n.endswith("." + s) for s in skip)]
    detach(model, probe)  # the original modules are back in place
    err_before = err_after = norm = 0.0
    inits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for n, rank, scaling in plan:
        base = model.get_submodule(n)
        if device is not None:
            base.to(device)  # quantized (and factorised) on the device it will train on, as quantize does
        W = base.weight.detach().float()                        # (d_out, d_in)
        plain = _dequantized(quantized_linear(base, fmt, **qkw))
        A, B, Q = _alternate(base, W, rank, scaling, fmt, iterations, qkw)
        err_before += (W - plain).pow(2).sum().item()
        err_after += (W - _dequantized(Q) - scaling * (B @ A)).pow(2).sum().item()
        norm += W.pow(2).sum().item()
        parent, _, leaf = n.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, Q)
        inits[n] = (A, B)
    quantize(model, fmt, **quantize_kwargs)  # the other linear layers (and rest_dtype), as quantize does
    report = LoftqReport(len(inits), (err_before / max(norm, 1e-30)) ** 0.5, (err_after / max(norm, 1e-30)) ** 0.5)
    return report, inits


def apply_loftq_init(model: nn.Module, inits: dict[str, tuple[torch.Tensor, torch.Tensor]],
                     name: str = "default") -> int:
    """Copy :func:`loftq_quantize`'s initial ``(A, B)`` into adapter ``name``, attached since with the
    same config; returns how many layers took one. A layer the adapter does not hold is an error."""
    layers = dict(adapted_layers(model))
    for n, (A, B) in inits.items():
        layer = layers.get(n)
        if layer is None or name not in layer.adapters:
            raise ValueError(f"loftq: adapter {name!r} is not attached to {n!r}; attach the LoRA config "
                             "loftq_quantize was given")
        adapter = layer.adapters[name]
        with torch.no_grad():
            adapter.A.copy_(A.to(adapter.A.dtype))
            adapter.B.copy_(B.to(adapter.B.dtype))
    return len(inits)


def _alternate(base: nn.Linear, W: torch.Tensor, rank: int, scaling: float, fmt: str, iterations: int,
               kw: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, nn.Module]:
    A = W.new_zeros(rank, W.shape[1])   # (r, d_in)
    B = W.new_zeros(W.shape[0], rank)   # (d_out, r)
    Q: nn.Module | None = None
    for _ in range(iterations):
        target = nn.Linear(W.shape[1], W.shape[0], bias=base.bias is not None, device="meta")
        target.weight = nn.Parameter(W - scaling * (B @ A), requires_grad=False)
        target.bias = base.bias
        Q = quantized_linear(target, fmt, **kw)
        U, S, Vh = torch.linalg.svd((W - _dequantized(Q)) / scaling, full_matrices=False)
        root = S[:rank].sqrt()                                  # (r,)
        B, A = U[:, :rank] * root, root[:, None] * Vh[:rank]    # s·B A = best rank-r residual
    assert Q is not None
    return A, B, Q


def _dequantized(module: nn.Module) -> torch.Tensor:
    found = quantized_format(module)
    assert found is not None
    return found[0].dequantize(module).float()


__all__ = ["LoftqReport", "apply_loftq_init", "loftq", "loftq_quantize"]
