"""LayerNorm tuning: train only the normalisation layers' gains and biases.

    LayerNorm(x) = γ' ⊙ (x − μ) / √(σ² + ε) + β',    RMSNorm(x) = γ' ⊙ x / √(mean(x²) + ε)

with γ', β' trained and every other weight frozen (Zhao et al., 2023, "Tuning LayerNorm in
Attention: Towards Efficient Multi-Modal LLM Finetuning", arXiv:2312.11420; Hugging Face PEFT's
``LNTuningConfig``).

Each norm layer gets a :class:`~deltatune.methods.partial.TunedCopy`: a trainable copy of its own
parameters, run through the frozen layer's own forward, so any norm implementation works
(``nn.LayerNorm``, ``nn.RMSNorm``, transformers' ``LlamaRMSNorm``...). This is PEFT's definition
(PEFT deep-copies the layer); merging swaps the copy into the base exactly, as PEFT does.
Norm layers are those ``core.layers.describe`` calls ``norm`` (instances of ``nn.LayerNorm`` /
``nn.RMSNorm`` or classes whose name ends in ``LayerNorm`` / ``RMSNorm``) that own parameters.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from torch import nn

from deltatune.config import AdapterConfig, Target
from deltatune.core.layer import Adapter
from deltatune.core.layers import describe
from deltatune.methods.partial import TunedCopy, owns_parameters


def is_norm(name: str, module: nn.Module) -> bool:
    """Whether ``module`` is a LayerNorm or RMSNorm layer with learnable parameters."""
    spec = describe(module)
    return spec is not None and spec.kind == "norm" and owns_parameters(module)


@dataclasses.dataclass(frozen=True)
class LNTuningConfig(AdapterConfig):
    """LayerNorm tuning. By default every LayerNorm / RMSNorm layer of the model trains; give
    ``target`` (e.g. ``["input_layernorm", "post_attention_layernorm"]``) to choose some."""

    method: ClassVar[str] = "ln"
    family: ClassVar[str] = "specification"
    suggested_lr: ClassVar[float | None] = 1e-2  # measured on the tweet-sentiment task (4,000 examples, one epoch): at 1e-3 it stayed near the majority class
    default_target: ClassVar[Target] = staticmethod(is_norm)  # type: ignore[assignment]

    def build(self, name: str, base: nn.Module) -> Adapter | None:
        return TunedCopy(base) if is_norm(name, base) else None
