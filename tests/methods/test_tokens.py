"""Selected embedding rows: the definition (a matrix with those rows replaced), tied heads, new
tokens, and parity with Hugging Face PEFT's trainable tokens on identical weights."""

from __future__ import annotations

import copy

import pytest
import torch

import deltatune as dt
from deltatune.methods.tokens import TokenRows
from tests.models import ZOO

IDS = [3, 17, 42]


def _set_rows(model, seed=0):
    ad = next(layer.adapters["default"] for _, layer in dt.core.records.adapted_layers(model)
              if isinstance(layer.adapters["default"], TokenRows))
    with torch.no_grad():
        ad.rows.copy_(torch.randn(ad.rows.shape, generator=torch.Generator().manual_seed(seed)))
    return ad


def _reference(zoo_name, ad, input_embeddings):
    """A plain model whose embedding matrix has the selected rows replaced (tied heads follow)."""
    ref = ZOO[zoo_name].build()
    with torch.no_grad():
        input_embeddings(ref).weight[ad.token_ids] = ad.rows
    return ref


@pytest.mark.parametrize("zoo_name", ["llama", "gpt2", "bert"])
def test_equals_a_matrix_with_the_rows_replaced(zoo_name):
    zoo = ZOO[zoo_name]
    model = zoo.build()
    report = dt.attach(model, dt.TokensConfig(token_ids=IDS))
    assert report.trainable_parameters == len(IDS) * 32
    ad = _set_rows(model)
    ref = _reference(zoo_name, ad, lambda m: m.get_input_embeddings())
    # GPT-2 ties its output head to the embedding: the selected tokens' logits change too.
    expected = zoo.run(ref)
    torch.testing.assert_close(zoo.run(model), expected, rtol=0, atol=1e-5)
    dt.merge(model)
    torch.testing.assert_close(zoo.run(model), expected, rtol=0, atol=1e-5)
    dt.unmerge(model)
    assert torch.equal(model.get_input_embeddings().weight, zoo.build().get_input_embeddings().weight)


def test_only_selected_rows_get_gradients_and_other_tokens_are_untouched():
    zoo = ZOO["llama"]
    model = zoo.build()
    dt.attach(model, dt.TokensConfig(token_ids=IDS))
    emb = model.model.embed_tokens
    ids = torch.tensor([[3, 5, 42, 99]])
    out = emb(ids)
    base = zoo.build().model.embed_tokens(ids)
    assert torch.equal(out, base)
    out.sum().backward()
    assert emb.adapters["default"].rows.grad.shape == (3, 32)
    assert emb.base.weight.grad is None


def test_new_tokens_and_reload_onto_a_differently_initialised_resize(tmp_path):
    zoo = ZOO["bert"]
    model = zoo.build()
    torch.manual_seed(1)
    model.resize_token_embeddings(104)  # four tokens added to the tokenizer, rows randomly initialised
    report = dt.attach(model, dt.TokensConfig(original_vocab_size=100, token_ids=[7]))
    ad = model.bert.embeddings.word_embeddings.adapters["default"]
    assert ad.token_ids.tolist() == [7, 100, 101, 102, 103]
    assert report.trainable_parameters == 5 * 32
    _set_rows(model)
    inputs = {"input_ids": torch.tensor([[1, 100, 7, 103, 2]]), "attention_mask": torch.ones(1, 5, dtype=torch.long)}
    expected = zoo.run(model, inputs)
    dt.save_adapter(model, tmp_path / "a")

    fresh = zoo.build()
    torch.manual_seed(2)
    fresh.resize_token_embeddings(104)  # the new rows come out different this time
    assert not torch.equal(fresh.get_input_embeddings().weight[100:], model.get_input_embeddings().weight[100:])
    dt.load_adapter(fresh, tmp_path / "a")
    torch.testing.assert_close(zoo.run(fresh, inputs), expected, rtol=0, atol=0)


def test_loading_rows_for_other_token_ids_fails(tmp_path):
    model = ZOO["llama"].build()
    dt.attach(model, dt.TokensConfig(token_ids=IDS))
    dt.save_adapter(model, tmp_path / "a")
    import json

    meta = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    meta["config"]["token_ids"] = [4, 17, 42]
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(meta))
    fresh = ZOO["llama"].build()
    with pytest.raises(ValueError, match="other token ids"):
        dt.load_adapter(fresh, tmp_path / "a")
    assert not dt.configs(fresh)  # nothing left attached


def test_default_trains_every_row_of_the_input_embeddings():
    report = dt.attach(ZOO["gpt2"].build(), dt.TokensConfig())
    assert report.targets == ["transformer.wte", "lm_head"]  # the head shares the embedding matrix
    assert report.trainable_parameters == 100 * 32
    assert dt.attach(ZOO["llama"].build(), dt.TokensConfig()).targets == ["model.embed_tokens"]  # untied
    with pytest.raises(ValueError, match="not tied"):
        dt.attach(ZOO["llama"].build(), dt.TokensConfig(target=["embed_tokens", "lm_head"]))
    with pytest.raises(dt.NoMatchError):
        dt.attach(ZOO["mlp"].build(), dt.TokensConfig())


def test_errors_name_the_fix():
    with pytest.raises(ValueError, match="resize"):
        dt.attach(ZOO["llama"].build(), dt.TokensConfig(token_ids=[100]))
    with pytest.raises(ValueError, match="no rows above"):
        dt.attach(ZOO["llama"].build(), dt.TokensConfig(original_vocab_size=100))
    with pytest.raises(ValueError, match="non-negative"):
        dt.TokensConfig(token_ids=[-1])


@pytest.mark.parametrize("zoo_name", ["llama", "gpt2"])
def test_matches_peft_trainable_tokens_merged_and_unmerged(zoo_name):
    from peft import TrainableTokensConfig, get_peft_model

    zoo = ZOO[zoo_name]
    model = zoo.build()
    target = "embed_tokens" if zoo_name == "llama" else "wte"
    peft_model = get_peft_model(copy.deepcopy(model), TrainableTokensConfig(target_modules=[target],
                                                                            token_indices=IDS)).eval()
    dt.attach(model, dt.TokensConfig(token_ids=IDS))
    theirs = peft_model.base_model.model.get_input_embeddings()
    with torch.no_grad():
        theirs.trainable_tokens_delta["default"].normal_()
        model.get_input_embeddings().adapters["default"].rows.copy_(theirs.trainable_tokens_delta["default"])
    expected = zoo.run(peft_model)
    assert not torch.allclose(expected, zoo.run(zoo.build()), rtol=1e-2, atol=1e-5)
    torch.testing.assert_close(zoo.run(model), expected, rtol=1e-5, atol=1e-5)
    dt.merge(model)
    peft_model.merge_adapter()
    torch.testing.assert_close(zoo.run(model), zoo.run(peft_model), rtol=1e-5, atol=1e-5)


def test_tied_head_follows_per_example_routing():
    from deltatune.core.routing import routing

    zoo = ZOO["gpt2"]
    model = zoo.build()
    for name, seed in (("a", 1), ("b", 2)):
        dt.attach(model, dt.TokensConfig(token_ids=IDS), name)
        with torch.no_grad():
            model.transformer.wte.adapters[name].rows.normal_(generator=torch.Generator().manual_seed(seed))
    inputs = zoo.inputs()
    with routing(model, ["a", None, "b"]):
        mixed = zoo.run(model, inputs)
    for row, choice in enumerate(["a", None, "b"]):
        with dt.using(model, () if choice is None else choice):
            alone = zoo.run(model, inputs)[row]
        torch.testing.assert_close(mixed[row], alone, rtol=0, atol=1e-5)


@pytest.mark.parametrize("order", [("lora", "tokens"), ("tokens", "lora")])
@pytest.mark.parametrize("kind", ["embedding", "bag"])
def test_a_hybrid_with_lora_on_the_same_table_merges_to_what_it_computes(order, kind):
    """LoRA and new rows on one table (the recommend task's hybrid): merged, every row (the new ones
    included) equals the unmerged output, in either order of the parts; unmerging gives it back.
    With LoRA inside, the merge used to overwrite the new rows with R and drop LoRA's share of them."""
    from torch import nn

    torch.manual_seed(0)
    table = nn.Embedding(12, 6) if kind == "embedding" else nn.EmbeddingBag(12, 6, mode="sum")
    model = nn.ModuleDict({"table": table})
    parts = {"lora": {"method": "lora", "target": ["table"], "rank": 2},
             "tokens": {"method": "tokens", "target": "table", "original_vocab_size": 9}}
    dt.attach(model, dt.config_from_dict({"method": "hybrid", "parts": [parts[p] for p in order]}))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    ids = torch.arange(12) if kind == "embedding" else torch.arange(12).view(6, 2)
    with torch.no_grad():
        unmerged = model["table"](ids)
        dt.merge(model)
        merged = model["table"](ids)
        dt.unmerge(model)
        again = model["table"](ids)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, unmerged, atol=1e-5, rtol=1e-5)  # LoRA unmerges by subtracting
