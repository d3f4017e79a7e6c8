"""The chat task: reply-only loss, prompt-grouped split, and a full run on a tiny random Llama."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deltatune.train import load_config, load_trained, run_training
from deltatune.train.chat import IGNORE, chatterbot_pairs, encode_pair, split_by_prompt
from deltatune.train.data import normalise
from deltatune.train.tasks import get_task
from tests.train.tiny import make_tiny_llama


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def test_split_keeps_each_prompt_in_one_split() -> None:
    pairs = chatterbot_pairs()
    assert 2300 < len(pairs) <= 2393  # consecutive turns; a few empty turns are dropped
    train, val, test = split_by_prompt(pairs, seed=0, validation=0.1, test=0.1)
    prompts = [{normalise(p) for p, _ in s} for s in (train, val, test)]
    assert not (prompts[0] & prompts[1]) and not (prompts[0] & prompts[2]) and not (prompts[1] & prompts[2])
    everything = train + val + test
    assert len({(normalise(p), normalise(r)) for p, r in everything}) == len(everything)  # no repeated pair


def test_loss_is_on_reply_tokens_only(tiny_llama: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    ids, n_prompt = encode_pair(tokenizer, "hello", "hi there")
    assert tokenizer.decode(ids[:n_prompt]) == "<|user|> hello <end> <|assistant|>"
    assert tokenizer.decode(ids[n_prompt:]) == "hi there <end>"
    task = get_task("chat")
    [item] = task.encode(tokenizer, [("hello", "hi there")], max_length=64)
    assert item["labels"][:n_prompt] == [IGNORE] * n_prompt and item["labels"][n_prompt:] == ids[n_prompt:]
    batch = task.collate([item, task.encode(tokenizer, [("a", "b")], 64)[0]], tokenizer)
    assert batch["labels"].shape == batch["input_ids"].shape
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE).all()


def test_evaluate_matches_the_models_own_loss(tiny_llama: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    task = get_task("chat")
    items = task.encode(tokenizer, [("hello", "hi there how are you")], 64)
    metrics = task.evaluate(model, items, tokenizer, 4, lambda m, b: m(**b))
    with torch.no_grad():
        expected = model(**task.collate(items, tokenizer)).loss.item()  # HF's mean over target tokens
    assert metrics["loss"] == pytest.approx(expected, rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)


def test_evaluate_with_virtual_tokens_scores_the_text_positions(tiny_llama: Path) -> None:
    """Prompt tuning puts N virtual tokens before the text: the logits have N more positions than
    the labels, and the loss is over the text's (as the model's own loss, which pads labels with -100)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import deltatune as dt

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    dt.attach(model, dt.PromptConfig(num_virtual_tokens=5))
    torch.nn.init.normal_(next(p for p in model.parameters() if p.requires_grad))  # a prompt that matters
    task = get_task("chat")
    items = task.encode(tokenizer, [("hello", "hi there how are you"), ("a", "b c")], 64)
    metrics = task.evaluate(model, items, tokenizer, 4, lambda m, b: m(**b))
    with torch.no_grad():
        expected = model(**task.collate(items, tokenizer)).loss.item()
    assert metrics["loss"] == pytest.approx(expected, rel=1e-5)


def test_chat_run_on_a_tiny_llama(tiny_llama: Path, tmp_path: Path) -> None:
    config = load_config(None, ["task=chat", f"model={tiny_llama}", f"output={tmp_path / 'run'}",
                                "data.max_train_examples=24", "data.max_eval_examples=6", "batch_size=8",
                                "epochs=2", "lr=1e-2", "adapter.dropout=0.0"])
    assert config.adapter_config().rank == 8 and config.max_length == 96  # the chat task's defaults
    metrics = run_training(config, progress=False)
    assert metrics["test_loss"] < metrics["base_test_loss"]  # 6 steps at lr 1e-2 learn the reply format
    assert len(metrics["samples"]) == 5 and all(isinstance(s["reply"], str) for s in metrics["samples"])
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["samples"] == metrics["samples"]
    saved = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    assert saved and not any("embed_tokens" in k or "lm_head" in k for k in saved)  # nothing new to save
    trained = load_trained(tmp_path / "run")
    rows = trained.task.predict(trained.model, trained.tokenizer, [{"prompt": "hello"}], trained.config,
                                trained.labels, lambda m, b: m(**b))
    assert rows[0]["prompt"] == "hello" and isinstance(rows[0]["reply"], str)


def test_chat_rejects_data_files() -> None:
    with pytest.raises(ValueError, match="chatterbot"):
        load_config(None, ["task=chat", "data.path=x.csv"])
