"""The one description of a base layer (core/layers.py) and the capability contract (core/contract.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import deltatune as dt
from deltatune.core.contract import (
    KeyValuePrefix,
    LowRank,
    LowRankConfig,
    Mergeable,
    Reparameterized,
    ReparameterizedConfig,
    VirtualTokens,
)
from deltatune.core.layers import LayerSpec, describe
from deltatune.core.parts import adapters_of
from deltatune.methods.lora import LoraLinear
from deltatune.methods.prefix import PrefixKV
from deltatune.methods.prompt import PromptEmbedding
from deltatune.methods.ptuning import PromptEncoder


class _LlamaRMSNorm(nn.Module):  # shaped like transformers' norms: no normalized_shape, a weight
    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))


@pytest.mark.parametrize("module, expected", [
    (nn.Linear(6, 4), LayerSpec("linear", 6, 4)),
    (Conv1D(4, 6), LayerSpec("linear", 6, 4, transposed=True)),  # Conv1D(nf=d_out, nx=d_in): weight (6, 4)
    (nn.Conv1d(4, 8, 3, stride=2, groups=2),
     LayerSpec("conv", 4, 8, kernel=(3,), stride=(2,), padding=(0,), dilation=(1,), groups=2)),
    (nn.Conv2d(3, 6, (3, 5), padding=1, dilation=2, groups=3),
     LayerSpec("conv", 3, 6, kernel=(3, 5), stride=(1, 1), padding=(1, 1), dilation=(2, 2), groups=3)),
    (nn.ConvTranspose2d(4, 2, 3),
     LayerSpec("conv", 4, 2, transposed=True, kernel=(3, 3), stride=(1, 1), padding=(0, 0), dilation=(1, 1))),
    (nn.Embedding(10, 4), LayerSpec("embedding", 10, 4)),
    (nn.EmbeddingBag(10, 4), LayerSpec("embedding_bag", 10, 4)),
    (nn.LayerNorm(8), LayerSpec("norm", 8, 8)),
    (nn.LayerNorm((2, 4)), LayerSpec("norm", 8, 8)),
    (nn.RMSNorm(5), LayerSpec("norm", 5, 5)),
    (_LlamaRMSNorm(7), LayerSpec("norm", 7, 7)),
], ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else "")
def test_describe_each_layer_kind(module, expected):
    spec = describe(module)
    assert spec == expected
    assert spec.quantized is None


def test_describe_weight_layout_matches_the_weight():
    gpt2, linear = describe(Conv1D(4, 6)), describe(nn.Linear(6, 4))
    assert tuple(Conv1D(4, 6).weight.shape) == (gpt2.d_in, gpt2.d_out)
    assert tuple(nn.Linear(6, 4).weight.shape) == (linear.d_out, linear.d_in)
    conv = nn.Conv2d(4, 8, 3, groups=2)
    spec = describe(conv)
    assert tuple(conv.weight.shape) == (spec.d_out, spec.d_in // spec.groups, *spec.kernel)
    assert spec.spatial == 2


@pytest.mark.parametrize("module", [nn.ReLU(), nn.Sequential(nn.Linear(2, 2)), nn.LSTM(2, 2), nn.GroupNorm(2, 4)])
def test_describe_returns_none_for_other_modules(module):
    assert describe(module) is None


@pytest.mark.parametrize("module", [nn.BatchNorm1d(4), nn.BatchNorm2d(4)])
def test_batch_norm_is_its_own_kind_with_one_width(module):
    spec = describe(module)
    assert (spec.kind, spec.d_in, spec.d_out) == ("batch_norm", 4, 4)


def test_capabilities_are_protocols_not_attribute_names():
    lora = LoraLinear(4, 3, rank=2)
    assert isinstance(lora, Mergeable) and isinstance(lora, LowRank)
    assert isinstance(PromptEmbedding(3, 4), VirtualTokens) and not isinstance(PromptEmbedding(3, 4), KeyValuePrefix)
    assert isinstance(PrefixKV(3), KeyValuePrefix) and not isinstance(PrefixKV(3), VirtualTokens)
    assert isinstance(PromptEncoder(3, 4, 8), Reparameterized)
    assert not isinstance(PromptEmbedding(3, 4), Reparameterized)
    assert isinstance(dt.PtuningConfig(), ReparameterizedConfig)
    assert not isinstance(dt.PromptConfig(), ReparameterizedConfig)
    assert isinstance(dt.LoraConfig(), LowRankConfig) and not isinstance(dt.IA3Config(), LowRankConfig)
    # A non-mergeable adapter is not Mergeable, and merging it says so.
    bias = dt.BitFitConfig().build("x", nn.Linear(2, 2))
    assert not isinstance(PromptEmbedding(3, 4), Mergeable) and not PromptEmbedding(3, 4).mergeable
    assert bias.mergeable  # merges by its own merge_into
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        PromptEmbedding(3, 4).merge_into(nn.Linear(2, 2))


def test_adapters_of_finds_each_parts_own_modules():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    lora, ia3 = dt.LoraConfig(target=["0", "2"], rank=2), dt.IA3Config(target=["2"], feedforward=())
    dt.attach(model, dt.HybridConfig(parts=(lora, ia3)), "h")
    registered = dt.configs(model)["h"]
    assert [(n, type(a).__name__) for n, a in adapters_of(model, "h", registered.parts[0])] == [
        ("0", "LoraLinear"), ("2", "LoraLinear")]
    assert [(n, type(a).__name__) for n, a in adapters_of(model, "h", registered.parts[1])] == [("2", "IA3")]
    assert len(adapters_of(model, "h")) == 3


SOURCES = Path(dt.__file__).parent


@pytest.mark.parametrize("pattern", [r'__name__\s*==\s*"Conv1D"', r"\.built_by\b"])
def test_no_class_name_sniffing_or_back_pointers(pattern):
    for folder in ("core", "methods"):
        for path in (SOURCES / folder).glob("*.py"):
            hit = re.search(pattern, path.read_text())
            assert hit is None, f"{folder}/{path.name} contains {hit.group(0)!r}"
