from __future__ import annotations

import re
from pathlib import Path

import pytest
from torch import nn

import deltatune as dt
from deltatune.core.targeting import block_index, name_matches, output_head_names
from tests.models import ZOO


def bert():
    return ZOO["bert"].build()


def test_exact_suffix_and_regex_patterns():
    assert name_matches("encoder.layer.0.attention.self.query", "query")
    assert name_matches("encoder.layer.0.attention.self.query", "self.query")
    assert name_matches("encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.query")
    assert not name_matches("encoder.layer.0.attention.self.query", "uery")  # suffixes respect dots
    assert name_matches("encoder.layer.1.attention.self.value", r"re:.*layer\.1\..*value")
    assert not name_matches("encoder.layer.1.attention.self.value", r"re:layer\.1")  # full match


def test_list_target_and_exclude():
    sel = dt.select(bert(), ["query", "value"], exclude=["re:.*layer\\.0\\..*"])
    assert sel.names == ["bert.encoder.layer.1.attention.self.query", "bert.encoder.layer.1.attention.self.value"]


def test_layer_indices_are_read_from_the_block_stack():
    model = bert()
    sel = dt.select(model, ["query"], layers=[1])
    assert sel.names == ["bert.encoder.layer.1.attention.self.query"]
    assert block_index(model)["bert.encoder.layer.0.output.dense"] == 0


def test_all_linear_skips_the_output_head():
    names = dt.select(ZOO["llama"].build(), "all-linear").names
    assert "lm_head" not in names and len(names) == 2 * 7
    bert_names = dt.select(bert(), "all-linear").names
    assert "classifier" not in bert_names and "bert.pooler.dense" in bert_names
    assert output_head_names(ZOO["mlp"].build()) == {"head"}
    gpt2 = dt.select(ZOO["gpt2"].build(), "all-linear").names
    assert "transformer.h.0.attn.c_attn" in gpt2  # transformers' Conv1D counts as linear


def test_callable_target():
    sel = dt.select(ZOO["cnn"].build(), lambda name, m: isinstance(m, nn.Conv2d))
    assert sel.names == ["conv1", "conv2"]


def test_zero_matches_shows_real_names():
    with pytest.raises(dt.NoMatchError, match=r"target 'q_proj' matched 0 of \d+ modules; names look like 'bert\."):
        dt.select(bert(), "q_proj")
    with pytest.raises(dt.NoMatchError, match=r"target \['q_proj', 'v_proj'\] matched 0 of"):
        dt.select(bert(), ("q_proj", "v_proj"))  # the patterns as a list, not a tuple's "('q_proj',)"
    with pytest.raises(dt.NoMatchError, match=r"in layers \[7\] \(the model has 2 blocks\)"):
        dt.select(bert(), "query", layers=[7])


def test_adapted_layers_are_seen_as_their_base():
    model = bert()
    dt.attach(model, dt.LoraConfig(target=["query"]), "a")
    # The same target again finds the same modules, not the adapter internals.
    assert dt.select(model, ["query"]).names == dt.select(bert(), ["query"]).names
    assert dt.select(model, "all-linear").names == dt.select(bert(), "all-linear").names


# Method names that are also ordinary words ("partial", "tokens") are checked through their
# config class and module path instead.
COMMON_WORDS = {"partial", "tokens", "ln", "prompt", "prefix", "full"}


def test_core_never_names_a_method():
    core = Path(dt.__file__).parent / "core"
    names = [m for m in dt.METHODS if m not in COMMON_WORDS]
    names += [cls.__name__ for cls in dt.METHODS.values()]
    names += [rf"methods\.{m}" for m in dt.METHODS]
    words = re.compile(r"\b(" + "|".join(sorted(names)) + r")\b", re.IGNORECASE)
    for path in core.glob("*.py"):
        hit = words.search(path.read_text())
        assert hit is None, f"{path.name} names the method {hit.group(0)!r}"
