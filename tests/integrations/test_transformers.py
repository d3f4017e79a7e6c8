"""transformers integration: Trainer, generate(), gradient checkpointing, save_pretrained after merge.

Nothing here needs glue code: an adapted model is still the same ``PreTrainedModel`` object with
some modules replaced, so transformers' own machinery must work on it unchanged. These tests hold
that promise on a tiny random Llama and BERT.
"""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from tests.models import ZOO

LLAMA, BERT = ZOO["llama"], ZOO["bert"]


def _adapted(zoo=LLAMA, config=None, seed: int = 0) -> torch.nn.Module:
    """A zoo model with a LoRA adapter whose factors are non-zero (as after training)."""
    model = zoo.build(seed)
    dt.attach(model, config or dt.LoraConfig(target=["q_proj", "v_proj", "down_proj", "embed_tokens"], rank=4))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model


class _Tokens(torch.utils.data.Dataset):
    """Random token sequences for causal language modelling (labels = inputs)."""

    def __init__(self, n: int = 8, length: int = 12) -> None:
        g = torch.Generator().manual_seed(5)
        self.ids = torch.randint(1, 100, (n, length), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.ids[i]}


def test_trainer_trains_an_adapted_model_unchanged(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = LLAMA.build()
    dt.attach(model, dt.LoraConfig(target=["q_proj", "v_proj"], rank=4))
    base = {k: v.clone() for k, v in model.state_dict().items() if ".adapters." not in k}
    adapter = {k: v.clone() for k, v in model.state_dict().items() if ".adapters." in k}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
                             report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, disable_tqdm=True)
    result = Trainer(model=model, args=args, train_dataset=_Tokens()).train()
    assert result.global_step == 4 and torch.isfinite(torch.tensor(result.training_loss))
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base.items())          # the base is bit-identical
    assert any(not torch.equal(after[k], v) for k, v in adapter.items())   # the adapter trained
    dt.save_adapter(model, tmp_path / "adapter")  # and what it trained saves as usual
    fresh = LLAMA.build()
    dt.load_adapter(fresh, tmp_path / "adapter")
    torch.testing.assert_close(LLAMA.run(fresh), LLAMA.run(model.eval()), rtol=0, atol=0)


def test_generate_with_an_active_adapter_matches_the_merged_model():
    model = _adapted().eval()
    prompt = LLAMA.inputs()
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        adapted = model.generate(**prompt, **kwargs)
        with dt.disabled(model):
            plain = model.generate(**prompt, **kwargs)
        dt.merge_and_unload(model)
        merged = model.generate(**prompt, **kwargs)
    assert torch.equal(adapted, merged)
    assert not torch.equal(adapted, plain)  # the adapter really took part


def test_generate_matches_peft_on_the_same_adapter(tmp_path):
    import peft
    model = _adapted().eval()
    dt.save_adapter(model, tmp_path / "a", format="peft")
    theirs = peft.PeftModel.from_pretrained(LLAMA.build(), tmp_path / "a").eval()
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(model.generate(**LLAMA.inputs(), **kwargs), theirs.generate(**LLAMA.inputs(), **kwargs))


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("targets", [["q_proj", "v_proj", "down_proj", "embed_tokens"], ["q_proj", "v_proj", "down_proj"]])
def test_gradient_checkpointing_gives_the_same_adapter_gradients(reentrant, targets):
    # Without an adapter on the embedding, no input of a checkpointed block needs a gradient: reentrant
    # checkpointing then relies on transformers making the embedding output require one.
    def gradients(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = _adapted(config=dt.LoraConfig(target=targets, rank=4)).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        inputs = LLAMA.inputs()
        model(**inputs, labels=inputs["input_ids"], use_cache=False).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys() and len(plain) == 2 * 2 * len(targets) - 2 * ("embed_tokens" in targets)
    for name, grad in plain.items():
        assert checkpointed[name] is not None, name
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("zoo_name", ["llama", "bert"])
def test_merged_model_saves_and_reloads_in_plain_transformers(zoo_name, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    zoo = ZOO[zoo_name]
    config = None if zoo_name == "llama" else dt.LoraConfig(target=["query", "value", "word_embeddings"],
                                                            modules_to_save=["classifier"], rank=4)
    model = _adapted(zoo, config).eval()
    with torch.no_grad():
        expected = zoo.run(model)
        dt.merge_and_unload(model)
    model.save_pretrained(tmp_path / "merged")
    auto = AutoModelForCausalLM if zoo_name == "llama" else AutoModelForSequenceClassification
    reloaded = auto.from_pretrained(tmp_path / "merged").eval()
    assert not any(isinstance(m, dt.AdaptedLayer) for m in reloaded.modules())
    with torch.no_grad():
        torch.testing.assert_close(zoo.run(reloaded), expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(zoo.run(reloaded), zoo.run(model), rtol=0, atol=0)
