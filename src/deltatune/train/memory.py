"""Memory levers of a training run: a quantized frozen base and a chunked language-model loss.

- ``quantize: nf4 | int8`` (with ``double_quant``, ``compute_dtype``, ``quantize_backend``):
  :func:`quantize_base` stores the base's linear layers in 4 or 8 bits before the adapter attaches
  (``deltatune.quantize``, integrations/quantize.py). Loading a trained adapter does the same to a
  fresh base first (``load_trained``), so the adapter meets the base it was trained on.
- ``loss_chunk: N``: :func:`chunked_runner` runs a causal LM with its output head swapped out, so the
  model returns hidden states (B, T, d) instead of logits (B, T, V), and :func:`chunked_cross_entropy`
  applies the head and the cross-entropy N target tokens at a time, each chunk under activation
  checkpointing: its (N, V) float32 logits are freed after forward and recomputed in backward. Only
  positions with a target (labels != -100) go through the head at all. SmolLM2's 49,152-token
  vocabulary makes the (B, T, V) logits (and their float32 copy in the loss) a large part of peak memory.
- ``quantize_blocksize: 32`` (NF4: a scale per 32 values, less rounding error) and ``quantize_skip:
  [v_proj]`` (those linear layers stay full precision besides the head) go to ``deltatune.quantize``
  through :func:`quantize_kwargs`, as do ``double_quant`` and ``compute_dtype``.
- ``loftq_iterations: N`` (``quantize`` with ``method: lora``): :func:`quantize_base` quantizes the
  adapted layers with LoftQ (integrations/loftq.py: Q = quant(W − s·B A), N alternations) and
  :func:`apply_loftq` starts the attached LoRA from its A, B instead of B = 0. ``load_trained`` runs
  the same (deterministic) quantization, so the adapter meets the base it was trained on.
- ``gradient_checkpointing`` lives in options.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

IGNORE = -100


def quantize_base(model: nn.Module, config: Any, loftq_init: bool = True,
                  device: torch.device | str | None = None) -> nn.Module:
    """``config.quantize`` applied to ``model`` (in place) before any adapter attaches; a no-op for none.
    ``device``: quantize there (the device it will run on) and leave the model there.

    With ``loftq_iterations`` the base is LoftQ's; ``loftq_init`` keeps LoftQ's starting factors on the
    model for :func:`apply_loftq` (training). A trained adapter about to be loaded needs only the base:
    pass ``loftq_init=False`` and nothing else stays on the model."""
    if config.quantize == "none":
        return model
    import deltatune as dt

    kwargs = quantize_kwargs(config) | {"backend": config.quantize_backend,
                                        "rest_dtype": getattr(config, "quantize_rest_dtype", None), "device": device}
    if getattr(config, "loftq_iterations", 0):
        from deltatune.integrations.loftq import loftq_quantize

        report, inits = loftq_quantize(model, config.adapter_config(), config.quantize,
                                       iterations=config.loftq_iterations, **kwargs)
        if loftq_init:
            model.__dict__[_LOFTQ] = (report, inits)  # taken by apply_loftq once the adapter is attached
        return model
    return dt.quantize(model, config.quantize, **kwargs)


def quantize_kwargs(config: Any) -> dict[str, Any]:
    """How ``config`` quantizes a linear layer, as ``deltatune.quantize`` keywords (also what ``deltatune
    merge --quantize`` re-quantizes with): double quantization, compute dtype, NF4 block size, and the
    layers kept in full precision (the head, plus ``quantize_skip``)."""
    from deltatune.integrations.quantize import DEFAULT_SKIP

    return {"double_quant": config.double_quant, "compute_dtype": config.compute_dtype,
            "blocksize": getattr(config, "quantize_blocksize", 64),
            "skip": DEFAULT_SKIP + tuple(getattr(config, "quantize_skip", ()))}


_LOFTQ = "_deltatune_loftq_init"


def apply_loftq(model: nn.Module, name: str = "default") -> Any:
    """After the adapter attached: LoRA's initial A, B from LoftQ (``loftq_iterations``, computed by
    :func:`quantize_base`), copied in and dropped from the model. Returns the ``LoftqReport`` (the
    weights' relative approximation error before and after), or ``None`` when LoftQ was not asked for."""
    stash = model.__dict__.pop(_LOFTQ, None)
    if stash is None:
        return None
    from deltatune.integrations.loftq import apply_loftq_init

    report, inits = stash
    apply_loftq_init(model, inits, name)
    return report


def chunked_cross_entropy(hidden: Tensor, labels: Tensor, head: Callable[[Tensor], Tensor], chunk: int) -> Tensor:
    """Mean next-token cross-entropy, as transformers' causal-LM loss computes it, ``chunk`` targets at a time.

    hidden (B, T, d) final hidden states, labels (B, T) with -100 where there is no target; position
    t predicts token t + 1. Equal to ``cross_entropy(head(hidden)[:, :-1], labels[:, 1:])``.
    """
    d = hidden.shape[-1]
    h = hidden[:, :-1].reshape(-1, d)                       # (B·(T-1), d)
    y = labels[:, 1:].reshape(-1).to(hidden.device)         # (B·(T-1),)
    keep = (y != IGNORE).nonzero().squeeze(1)
    h, y = h.index_select(0, keep), y.index_select(0, keep)  # (n, d), (n,): only positions with a target
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, y.numel(), chunk):
        total = total + checkpoint(_chunk_loss, head, h[i:i + chunk], y[i:i + chunk], use_reentrant=False)
    return total / max(y.numel(), 1)


def _chunk_loss(head: Callable[[Tensor], Tensor], h: Tensor, y: Tensor) -> Tensor:
    # bf16 hidden states (autocast ran the body) meet the head in its own dtype
    dtype = next((p.dtype for p in head.parameters() if p.is_floating_point()), h.dtype) if isinstance(head, nn.Module) else h.dtype
    return F.cross_entropy(head(h.to(dtype)).float(), y, reduction="sum")  # (c, V) logits, freed after the chunk


@contextmanager
def _head_removed(model: nn.Module) -> Iterator[nn.Module]:
    """The model's output head, swapped for the identity while the block runs (restored in finally)."""
    head = model.get_output_embeddings()
    model.set_output_embeddings(nn.Identity())
    try:
        yield head
    finally:
        model.set_output_embeddings(head)


def chunked_runner(run: Callable[[nn.Module, dict[str, Tensor]], Any], chunk: int) -> Callable[..., Any]:
    """``run`` with the loss of a batch that has ``labels`` computed by :func:`chunked_cross_entropy`."""

    def run_chunked(model: nn.Module, batch: dict[str, Tensor]) -> Any:
        if "labels" not in batch:
            return run(model, batch)  # evaluation: the logits themselves are wanted
        inner = getattr(model, "module", model)  # under DistributedDataParallel
        if not callable(getattr(inner, "get_output_embeddings", None)) or inner.get_output_embeddings() is None:
            raise ValueError(f"loss_chunk: {type(inner).__name__} has no output head to chunk; remove loss_chunk")
        batch = dict(batch)
        labels = batch.pop("labels")
        with _head_removed(inner) as head:
            out = run(model, batch)
            hidden = out.logits                          # (B, T', d): the head was the identity
            # virtual tokens (prompt tuning) come first: the last T positions line up with the labels
            hidden = hidden[:, hidden.shape[1] - labels.shape[1]:]
            out.loss = chunked_cross_entropy(hidden, labels, head, chunk)
        out.logits = None  # hidden states, not logits: nobody should read them as logits
        return out

    return run_chunked
