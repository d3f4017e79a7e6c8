"""What a run trains: every weight (:class:`FullStrategy`) or one adapter (:class:`AdapterStrategy`).

The loop asks a strategy five things and never which one it has::

    strategy.prepare(model)          make the model trainable (attach the adapter, or unfreeze all)
    strategy.trainable_parameters()  what the optimizer updates, by name
    strategy.extra_loss()            a term added to the task loss (e.g. AdaLoRA's orthogonality), or None
    strategy.on_step(step, total)    after each optimizer step, before zero_grad (AdaLoRA's budget)
    strategy.state() / load_state()  every tensor a checkpoint needs besides the trainable parameters

and ``strategy.save(out, ...)`` writes the result: ``out/adapter`` or ``out/model``.

An adapter's checkpoint state is everything in its modules' ``state_dict`` (parameters and
persistent buffers, e.g. AdaLoRA's rank mask) plus what an adapter module declares through the
:class:`~deltatune.core.contract.TrainingState` capability (e.g. AdaLoRA's importance averages),
so a resumed run continues exactly, whatever the method.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from torch import Tensor, nn

import deltatune as dt
from deltatune.core.contract import TrainingState
from deltatune.core.records import adapted_layers
from deltatune.core.files import atomic_directory

TRAINING_FILE = "deltatune_training.json"  # beside a full model (or a PEFT-format adapter): how it was trained


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


class Strategy:
    """The interface; :class:`FullStrategy` and :class:`AdapterStrategy` fill it in."""

    kind: str
    model: nn.Module

    def prepare(self, model: nn.Module, new_modules: list[str] | tuple[str, ...] = ()) -> None:
        raise NotImplementedError

    def report(self) -> str:
        """One paragraph on what trains (printed at the start of a run)."""
        raise NotImplementedError

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return trainable(self.model)

    def extra_loss(self) -> Tensor | None:
        return None

    def on_step(self, step: int, total: int) -> None:
        pass

    def state(self) -> dict[str, Tensor]:
        raise NotImplementedError

    def load_state(self, tensors: dict[str, Tensor]) -> None:
        raise NotImplementedError

    def save(self, out: Path, tokenizer: Any, meta: dict[str, Any], save_format: str = "deltatune") -> Path:
        raise NotImplementedError


class FullStrategy(Strategy):
    """Full fine-tuning: every weight trains; the result is a transformers model directory."""

    kind = "full"

    def prepare(self, model: nn.Module, new_modules: list[str] | tuple[str, ...] = ()) -> None:
        self.model = model
        for p in model.parameters():
            p.requires_grad_(True)

    def report(self) -> str:
        return f"method full: {dt.parameter_report(self.model)}"

    def state(self) -> dict[str, Tensor]:
        """The buffers (e.g. batch-norm running statistics): the parameters are saved as trainable."""
        buffers = dict(self.model.named_buffers())
        return {k: v for k, v in self.model.state_dict().items() if k in buffers}

    def load_state(self, tensors: dict[str, Tensor]) -> None:
        self.model.load_state_dict(tensors, strict=False)

    def save(self, out: Path, tokenizer: Any, meta: dict[str, Any], save_format: str = "deltatune") -> Path:
        artifact = out / "model"
        with atomic_directory(artifact) as tmp:
            self.model.save_pretrained(tmp)
            if tokenizer is not None:  # a task with its own models may have none (e.g. a recommender)
                tokenizer.save_pretrained(tmp)
            (tmp / TRAINING_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        return artifact


class AdapterStrategy(Strategy):
    """One adapter, ``config``, attached as ``name``; the base stays frozen."""

    kind = "adapter"

    def __init__(self, config: dt.AdapterConfig, name: str = "default") -> None:
        self.config, self.name = config, name
        self.attached: dt.AttachReport | None = None

    def prepare(self, model: nn.Module, new_modules: list[str] | tuple[str, ...] = ()) -> None:
        """Attach the adapter. Freshly initialised head modules (``new_modules``) are added to
        ``modules_to_save`` when the config names none, so they train and save with the adapter;
        a config that names some must cover them."""
        self.model, config = model, self.config
        if new_modules and not config.modules_to_save:
            config = dataclasses.replace(config, modules_to_save=tuple(new_modules))
        elif new_modules:
            saved = set(dt.select(model, list(config.modules_to_save)).names)
            untrained = [m for m in new_modules if m not in saved]
            if untrained:
                raise ValueError(f"{untrained[0]!r} starts with random weights but is not in adapter.modules_to_save; "
                                 "add it, or leave modules_to_save unset to have it added")
        self.attached = dt.attach(model, config, self.name)

    def report(self) -> str:
        return str(self.attached)

    def extra_loss(self) -> Tensor | None:
        return dt.regularization_loss(self.model)

    def on_step(self, step: int, total: int) -> None:
        dt.on_train_step(self.model, step, total)  # looked up on dt at call time: tests wrap it

    def _modules(self) -> list[tuple[str, nn.Module]]:
        return [(n, layer.adapters[self.name]) for n, layer in adapted_layers(self.model) if self.name in layer.adapters]

    def state(self) -> dict[str, Tensor]:
        """Each adapter module's ``state_dict`` and declared :class:`TrainingState`, by module name.

        ``~`` separates a module from its training-state key (no ``state_dict`` key holds one)."""
        tensors: dict[str, Tensor] = {}
        for layer_name, adapter in self._modules():
            for key, t in adapter.state_dict().items():
                tensors[f"{layer_name}.{key}"] = t
            for sub_name, sub in adapter.named_modules():
                if isinstance(sub, TrainingState):
                    prefix = ".".join(filter(None, (layer_name, sub_name)))
                    for key, t in sub.training_state().items():
                        tensors[f"{prefix}~{key}"] = t
        return tensors

    def load_state(self, tensors: dict[str, Tensor]) -> None:
        for layer_name, adapter in self._modules():
            own = {k[len(layer_name) + 1:]: t for k, t in tensors.items() if k.startswith(f"{layer_name}.") and "~" not in k}
            adapter.load_state_dict(own)  # strict: a checkpoint of another config fails here, naming the key
            for sub_name, sub in adapter.named_modules():
                if isinstance(sub, TrainingState):
                    prefix = ".".join(filter(None, (layer_name, sub_name))) + "~"
                    sub.load_training_state({k[len(prefix):]: t for k, t in tensors.items() if k.startswith(prefix)})

    def save(self, out: Path, tokenizer: Any, meta: dict[str, Any], save_format: str = "deltatune") -> Path:
        artifact = out / "adapter"
        if _is_sharded(self.model):  # FSDP2: every rank gathers the adapter's shards, rank 0 writes
            from deltatune.integrations.distributed import is_main_process, save_on_rank0

            save_on_rank0(self.model, artifact, self.name, format=save_format,
                          extra={"training": meta} if save_format == "deltatune" else None)
            if save_format == "peft" and is_main_process():
                (artifact / TRAINING_FILE).write_text(json.dumps(meta, indent=2) + "\n")
            return artifact
        if save_format == "peft":  # PEFT's config has no room for ours: the run's meta goes beside it
            with atomic_directory(artifact) as tmp:
                dt.save_adapter(self.model, tmp, format="peft")
                (tmp / TRAINING_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        else:
            dt.save_adapter(self.model, artifact, extra={"training": meta})
        return artifact


def _is_sharded(model: nn.Module) -> bool:
    import sys

    if "torch.distributed.fsdp" not in sys.modules:
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def strategy_for(adapter_config: dt.AdapterConfig | None, name: str = "default") -> Strategy:
    """The strategy for a config's ``adapter_config()``: ``None`` means full fine-tuning."""
    return FullStrategy() if adapter_config is None else AdapterStrategy(adapter_config, name)


__all__ = ["TRAINING_FILE", "AdapterStrategy", "FullStrategy", "Strategy", "strategy_for", "trainable"]
