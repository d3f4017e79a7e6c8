"""The models and batches the benchmark runs on.

A :class:`Workload` says how to build the pretrained model, how to make one fixed training batch,
and which modules each method targets. The real workloads are all-MiniLM-L6-v2 (a 6-layer BERT
encoder with a new 3-class head, batch 32 x 128 tokens) and SmolLM2-135M (a 30-layer Llama,
causal-LM loss, batch 4 x 256 tokens); ``tiny-*`` ones are random-weight models for ``--quick``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class Workload:
    """One model plus one batch shape, and the target modules for every method."""

    name: str
    factory: Callable[[], nn.Module]
    batch: int
    length: int
    vocab: int
    causal: bool
    lora_target: list[str]           # LoRA / DoRA targets (module-name suffixes)
    ia3_target: list[str]            # (IA)³ targets
    ia3_feedforward: list[str]       # (IA)³ targets scaled on their input (a subset of ia3_target)
    head: list[str] = field(default_factory=list)  # new head trained in full (modules_to_save)

    def build(self) -> nn.Module:
        torch.manual_seed(0)
        return self.factory()

    def make_batch(self, seed: int = 0, device: str = "cpu") -> dict[str, torch.Tensor]:
        """A fixed batch: random token ids (no padding) and labels, the same for every setup."""
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(5, self.vocab, (self.batch, self.length), generator=g)
        labels = ids.clone() if self.causal else torch.randint(0, 3, (self.batch,), generator=g)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
        return {k: v.to(device) for k, v in batch.items()}


def _quiet_transformers() -> None:
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def minilm() -> nn.Module:
    from transformers import AutoModelForSequenceClassification

    from deltatune.train.models import minilm_dir

    _quiet_transformers()
    return AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=3)


def smollm2() -> nn.Module:
    """SmolLM2-135M-Instruct in float32; the shared loader converts the packaged GGUF once and
    caches it under ``~/.cache/deltatune/`` (``DELTATUNE_CACHE`` overrides)."""
    from transformers import AutoModelForCausalLM

    from deltatune.train.models import smollm2_dir

    _quiet_transformers()
    return AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=torch.float32)


def tiny_bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    _quiet_transformers()
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=37, max_position_embeddings=64, num_labels=3)
    return BertForSequenceClassification(cfg)


def tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    _quiet_transformers()
    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg)


_BERT = dict(lora_target=["query", "key", "value", "dense"], ia3_target=["key", "value", "output.dense"],
             ia3_feedforward=["output.dense"], head=["classifier"], causal=False)
_LLAMA = dict(lora_target=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
              ia3_target=["k_proj", "v_proj", "down_proj"], ia3_feedforward=["down_proj"], causal=True)

WORKLOADS: dict[str, Workload] = {
    "minilm": Workload("all-MiniLM-L6-v2", minilm, batch=32, length=128, vocab=30522, **_BERT),
    "smollm2": Workload("SmolLM2-135M", smollm2, batch=4, length=256, vocab=49152, **_LLAMA),
    "tiny-bert": Workload("tiny-bert", tiny_bert, batch=4, length=16, vocab=100, **_BERT),
    "tiny-llama": Workload("tiny-llama", tiny_llama, batch=2, length=16, vocab=100, **_LLAMA),
}
