"""The configurations compared: full fine-tuning, and each method in deltatune and in HF PEFT.

Every setup starts from a deep copy of the same loaded base model, with the same hyperparameters
in both libraries (rank 8, alpha 16, no adapter dropout, the workload's targets, the new head
trained in full), so the only difference is the implementation.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from bench.workloads import Workload

RANK, ALPHA = 8, 16.0

#: setup name -> (library, method). "full" trains every parameter. "floor" trains only the new head
#: but makes the embedding output require a gradient, so backward computes every layer's input
#: gradient and no weight gradient: the cost no adapter method can go below.
SETUPS: dict[str, tuple[str, str]] = {
    "full": ("torch", "full"),
    "floor": ("torch", "floor"),
    "deltatune-lora": ("deltatune", "lora"),
    "deltatune-lora-aten": ("deltatune", "lora"),
    "deltatune-lora-thin": ("deltatune", "lora"),
    "deltatune-lora-onednn": ("deltatune", "lora"),
    "peft-lora": ("peft", "lora"),
    "deltatune-dora": ("deltatune", "dora"),
    "peft-dora": ("peft", "dora"),
    "deltatune-ia3": ("deltatune", "ia3"),
    "peft-ia3": ("peft", "ia3"),
}


class Unavailable(Exception):
    """A setup that cannot run here (e.g. a method not written yet); the bench prints the reason."""


@dataclass
class Setup:
    name: str
    model: nn.Module
    trainable: list[nn.Parameter]

    def engine(self) -> contextlib.AbstractContextManager:
        """The fused LoRA kernel's CPU engine: the default ("auto"), or the one a "-aten"/"-thin"/"-onednn"
        suffix names."""
        suffix = self.name.rsplit("-", 1)[-1]
        if suffix not in ("aten", "thin", "onednn"):
            return contextlib.nullcontext()
        from deltatune.core.products import cpu_engine

        return cpu_engine(suffix)

    def optimizer(self) -> torch.optim.Optimizer:
        # A frozen causal LM under "floor" trains nothing: a dummy parameter keeps the loop uniform.
        return torch.optim.AdamW(self.trainable or [nn.Parameter(torch.zeros(1))], lr=1e-4)


def _deltatune_config(workload: Workload, method: str):
    import deltatune

    if method not in deltatune.METHODS:
        raise Unavailable(f"deltatune has no method {method!r} yet")
    cls = deltatune.METHODS[method]
    fields = {f.name for f in dataclasses.fields(cls)}
    kw: dict = {"modules_to_save": tuple(workload.head)}
    if method == "ia3":
        kw["target"] = tuple(workload.ia3_target)
        ff = next((f for f in ("feedforward", "feedforward_modules", "feedforward_target") if f in fields), None)
        if ff is None:
            raise Unavailable("deltatune's ia3 config has no feed-forward field this bench knows")
        kw[ff] = tuple(workload.ia3_feedforward)
    else:
        kw.update(target=tuple(workload.lora_target), rank=RANK, alpha=ALPHA)
    return cls(**{k: v for k, v in kw.items() if k in fields})


def _peft_config(workload: Workload, method: str):
    import peft

    save = workload.head or None
    if method == "ia3":
        return peft.IA3Config(target_modules=workload.ia3_target, feedforward_modules=workload.ia3_feedforward,
                              modules_to_save=save)
    return peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=workload.lora_target,
                           modules_to_save=save, use_dora=method == "dora")


def build(name: str, workload: Workload, base: nn.Module, *, copy_base: bool = True) -> Setup:
    """Build setup ``name`` on a deep copy of ``base`` (or on ``base`` itself), in train mode."""
    if name not in SETUPS:
        raise ValueError(f"unknown setup {name!r}; choose from {', '.join(SETUPS)}")
    library, method = SETUPS[name]
    config = None
    if library == "deltatune":
        config = _deltatune_config(workload, method)   # raises Unavailable before copying
    model = copy.deepcopy(base) if copy_base else base
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif method == "floor":
        _freeze_except_head(model, workload.head)
    elif library == "deltatune":
        import deltatune

        deltatune.attach(model, config)
    else:
        import peft

        model = peft.get_peft_model(model, _peft_config(workload, method))
    model.train()
    return Setup(name, model, [p for p in model.parameters() if p.requires_grad])


def _freeze_except_head(model: nn.Module, head: list[str]) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(any(name.startswith(h + ".") for h in head))
    embeddings = model.get_input_embeddings()
    embeddings.register_forward_hook(lambda module, args, out: out.requires_grad_())


def randomize_adapters(model: nn.Module, seed: int = 0) -> None:
    """Give every trainable tensor small random values, so an adapter changes the outputs
    (LoRA's B starts at zero) and merging does real work."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device) * 0.01)


def enable_checkpointing(model: nn.Module) -> None:
    """transformers' gradient checkpointing (non-reentrant: works with a frozen embedding)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    kwargs = {"use_reentrant": False}
    if hasattr(inner, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name warns
        inner.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
