"""What ``deltatune serve MODEL`` serves: the base model, its tokenizer, and what kind of answers it gives.

``MODEL`` is a built-in name (``smollm2-135m``), a transformers model directory, or a training run
(or its ``adapter/`` folder): then the base is the run's base model and the run's adapter is
served under the run's folder name; a run trained on a quantized base (``quantize: nf4 | int8``) is served
on that base, quantized again as in training, so its answers are the trained model's. A causal LM generates (``/v1/completions``,
``/v1/chat/completions``); any other head classifies (``/v1/classify``), with the number of labels
read from the first classifier adapter's recorded training config.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deltatune.train.models import (find_trained, load_model, read_trained, resolve_model, storage_mismatch,
                                     training_record)
from deltatune.train.tasks import get_task


@dataclass
class Served:
    model: nn.Module
    tokenizer: Any
    kind: str  # "generate" or "classify"
    name: str  # the base model's id in /v1/models
    adapters: dict[str, Path] = field(default_factory=dict)  # from a training run, served at start
    max_len: int = 2048
    quantize: str = "none"  # the base's storage: a run trained with ``quantize: nf4 | int8`` is served on that


def recorded_labels(path: Path) -> list[str] | None:
    """The class names a classifier adapter was trained with (None if it records none)."""
    labels = training_record(path).get("labels")
    return list(labels) if labels else None


def base_mismatch(path: Path, served: Served) -> str | None:
    """A line saying why ``path``'s adapter will not answer as it did in training on ``served``'s base
    (trained on a quantized base and served on a full-precision one, or the other way round), else None."""
    return storage_mismatch(path, served.quantize, "served")


def _trained(model: str) -> tuple[str, Path] | None:
    """``("adapter", dir)`` / ``("full", dir)`` for what ``deltatune train`` wrote, else None."""
    try:
        return find_trained(model)
    except ValueError:
        return None


def load_served(model: str, adapters: dict[str, Path], device: torch.device, dtype: torch.dtype) -> Served:
    """Load ``model`` (see the module's doc) onto ``device`` in ``dtype``, in eval mode."""
    served_adapters: dict[str, Path] = {}
    trained = _trained(model)
    run = read_trained(model) if trained is not None else None  # what the run says, read once
    if run is not None and run.task.inputs != "text":
        raise ValueError(f"deltatune serve answers text (completions, chat, classify); {model} was trained on "
                         f"task {run.task.name}, which reads {run.task.inputs}: score them with deltatune predict "
                         f"{model} --input FILE --output FILE")
    recorded = run if run is not None and run.kind == "adapter" else None
    if run is not None and run.kind == "full":  # a merged run: its model/ folder is a plain model
        model = str(run.where)
    if recorded is not None:
        task, base_name = recorded.task, recorded.config.model
        labels = recorded.labels if task.kind != "causal-lm" else None
        where = recorded.where
        served_adapters[(where.parent if where.name == "adapter" else where).name] = where
        with torch.random.fork_rng(devices=[]):  # a fresh head starts as it did in training (it is replaced)
            torch.manual_seed(recorded.config.seed)
            loaded = load_model(base_name, task, labels)
    else:
        path = resolve_model(model)
        config = json.loads((path / "config.json").read_text())
        causal = any(a.endswith(("CausalLM", "LMHeadModel")) for a in config.get("architectures") or [])
        base_name = model
        if causal:
            loaded = load_model(model, get_task("chat"))
        else:
            # a model deltatune merged records its class names beside it; else the first adapter that does
            labels = next((found for p in (path, *adapters.values()) if (found := recorded_labels(p))), None)
            if labels is None:
                raise ValueError(f"{model} is not a causal LM, so it serves classification, but no --adapter "
                                 "records its label names; pass a classifier adapter saved by deltatune train")
            loaded = load_model(model, get_task("classification"), labels)
    kind = "generate" if hasattr(loaded.model, "generate") and "CausalLM" in type(loaded.model).__name__ else "classify"
    served_name = Path(base_name).name if Path(base_name).is_dir() else base_name
    net = loaded.model
    quantized = recorded is not None and recorded.config.quantize != "none"
    if quantized:  # the base the run's adapter was trained on, quantized from its float32 weights as in training
        from deltatune.train.memory import quantize_base

        quantize_base(net, recorded.config, loftq_init=False, device=device)
    if getattr(net, "is_quantized", False):  # transformers loaded it in 4/8 bits (a re-quantized merge): it
        net = net.eval()                         # placed the weights and refuses .to(); they stay as loaded
    else:
        net = net.to(device=device, dtype=dtype).eval()  # casts floating tensors only: packed weights stay
    for p in net.parameters():
        p.requires_grad_(False)
    limit = getattr(net.config, "max_position_embeddings", None) or 2048
    return Served(model=net, tokenizer=loaded.tokenizer, kind=kind, name=served_name, adapters=served_adapters,
                  max_len=int(limit), quantize=recorded.config.quantize if quantized else "none")
