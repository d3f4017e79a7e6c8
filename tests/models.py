"""Tiny random-weight models for tests: an MLP, a CNN, ResNet- and ViT-style image models, and BERT / Llama / GPT-2 built from configs.

Each ``ZooModel`` builds a fresh model with a fixed seed (so two builds have identical weights),
fixed inputs, and ``run(model)`` returning one float tensor to compare. ``extra_targets`` are
target specs worth trying on top of each method's default (e.g. the CNN's convolutions).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2)
        self.conv3 = nn.Conv1d(8, 8, 1)
        self.fc = nn.Linear(8, 16)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))  # (B, 8, 3, 3)
        h = torch.relu(self.conv3(h.flatten(2))).mean(-1)        # (B, 8)
        return self.head(torch.relu(self.fc(h)))


def _bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=37, max_position_embeddings=64, num_labels=3,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg)


def _llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg)


def _resnet() -> nn.Module:
    from deltatune.train.image_models import TinyResNet

    return TinyResNet(num_classes=4)


def _vit() -> nn.Module:
    from deltatune.train.image_models import TinyViT

    return TinyViT(num_classes=4, image_size=16)


def _pictures() -> torch.Tensor:
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def _quantized(factory: Callable[[], nn.Module], fmt: str) -> Callable[[], nn.Module]:
    """``factory``'s model with its linear layers (the classifier head aside) quantized to ``fmt``
    by bitsandbytes, as ``deltatune.quantize`` does before adapters attach."""
    def build() -> nn.Module:
        import deltatune as dt

        return dt.quantize(factory(), fmt)
    return build


def _ids(vocab: int = 100) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, vocab, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # one padded row
    return {"input_ids": ids, "attention_mask": mask}


@dataclass
class ZooModel:
    name: str
    factory: Callable[[], nn.Module]
    inputs: Callable[[], Any]
    extra_targets: list[Any] = field(default_factory=list)
    transformers: bool = False
    quantized: str | None = None  # the base's linear layers are stored in this format (bitsandbytes)

    def build(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return self.factory().eval()

    def run(self, model: nn.Module, inputs: Any | None = None) -> torch.Tensor:
        inputs = self.inputs() if inputs is None else inputs
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
        return out.logits if hasattr(out, "logits") else out


ZOO: dict[str, ZooModel] = {
    "mlp": ZooModel("mlp", MLP, lambda: torch.randn(4, 16, generator=torch.Generator().manual_seed(1))),
    "cnn": ZooModel("cnn", CNN, lambda: torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)),
                    extra_targets=[["conv1", "conv2", "conv3"]]),
    # image models of train/image_models.py (ResNet- and ViT-style, random weights; BatchNorm statistics frozen)
    "resnet": ZooModel("resnet", _resnet, _pictures, extra_targets=["all-conv"]),
    "vit": ZooModel("vit", _vit, _pictures),
    "bert": ZooModel("bert", _bert, _ids, extra_targets=[["word_embeddings"]], transformers=True),
    "llama": ZooModel("llama", _llama, _ids, transformers=True),
    "gpt2": ZooModel("gpt2", _gpt2, _ids, transformers=True),
    # QLoRA-style: every method that applies trains on an NF4 base (double quantization, fp32 compute).
    "bert-nf4": ZooModel("bert-nf4", _quantized(_bert, "nf4"), _ids, transformers=True, quantized="nf4"),
}


def one_layer(base: nn.Module, config: Any) -> tuple[nn.Sequential, nn.Module]:
    """``base`` in float64 as ``model[0]`` with ``config``'s adapter (target ``"0"``, a config
    built with that target) and every adapter parameter drawn from N(0, 1), so the update is far
    from the identity: for checks against a method's float64 formula."""
    import deltatune as dt

    model = nn.Sequential(base.double())
    dt.attach(model, config)
    adapter = model[0].adapters["default"]
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_()
    return model, adapter
