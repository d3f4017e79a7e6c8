"""task: instruct — the user's JSONL conversations in both shapes, assistant-only loss, bad data
named by file and line, and a full run on a tiny random Llama against its base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from deltatune.train import load_config, load_trained, run_training
from deltatune.train.chat import IGNORE, chatterbot_pairs
from deltatune.train.instruct import encode_conversation, read_conversations, rouge_l
from deltatune.train.tasks import get_task
from tests.train.tiny import make_tiny_llama


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def _jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _conversations(n: int) -> list[dict]:
    """Both shapes, some multi-turn, from the chatterbot pairs (words the tiny tokenizer knows)."""
    pairs = chatterbot_pairs()[:n * 2]
    out: list[dict] = []
    for i in range(n):
        (p1, r1), (p2, r2) = pairs[2 * i], pairs[2 * i + 1]
        if i % 2:
            out.append({"prompt": p1, "response": r1})
        else:
            out.append({"messages": [{"role": "user", "content": p1}, {"role": "assistant", "content": r1},
                                     {"role": "user", "content": p2}, {"role": "assistant", "content": r2}]})
    return out


def test_both_shapes_read_alike(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "d.jsonl", [
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "hello"}]},
        {"prompt": "hi", "response": "hello", "system": "be brief"},
    ])
    [(a, where_a), (b, _)] = read_conversations(path)
    assert a == b == (("system", "be brief"), ("user", "hi"), ("assistant", "hello"))
    assert where_a == f"{path}, line 1"


@pytest.mark.parametrize("record, message", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "line 2: the conversation has no assistant turn"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]},
     "line 2: message 1 has role 'bot'; the chat template knows system, user, assistant"),
    ({"question": "hi", "answer": "x"}, "line 2: expected .*messages.* or .*prompt.*response.*got keys question"),
    ({"prompt": "hi", "response": 3}, "line 2: 'response' is 3, not a string"),
    ("{not json", "line 2: not JSON"),
])
def test_bad_conversations_are_named_by_file_and_line(tmp_path: Path, record: object, message: str) -> None:
    path = _jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "response": "b"}, record])
    with pytest.raises(ValueError, match=message):
        read_conversations(path)


@pytest.mark.parametrize("template", [True, False])
def test_loss_is_on_assistant_tokens_only(tmp_path: Path, template: bool) -> None:
    model = make_tiny_llama(tmp_path / "m", chat_template=template)
    tokenizer = AutoTokenizer.from_pretrained(model)
    turns = (("user", "hello"), ("assistant", "hi there"), ("user", "how are you"), ("assistant", "a b"))
    ids, labels = encode_conversation(tokenizer, turns)
    assert len(ids) == len(labels)
    trained = tokenizer.decode([t for t, lab in zip(ids, labels) if lab != IGNORE])
    masked = tokenizer.decode([t for t, lab in zip(ids, labels) if lab == IGNORE])
    assert trained == "hi there <end> a b <end>"
    if template:
        assert masked == "<|user|> hello <end> <|assistant|> <|user|> how are you <end> <|assistant|>"
        assert tokenizer.decode(ids) == tokenizer.apply_chat_template(
            [{"role": r, "content": c} for r, c in turns], tokenize=False).strip()
    else:  # the plain fallback: "User: ...", "Assistant: ..." lines (unknown words here)
        assert "hello" in masked and "how are you" in masked


def test_long_conversations_are_truncated_and_counted(tiny_llama: Path, capsys: pytest.CaptureFixture) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    task = get_task("instruct")
    long_reply = (("user", "hello"), ("assistant", " ".join(["hi"] * 50)))
    late_reply = (("user", " ".join(["hello"] * 50)), ("assistant", "hi"))
    items = task.encode(tokenizer, [(long_reply, "d.jsonl, line 1"), (late_reply, "d.jsonl, line 2"),
                                    ((("user", "a"), ("assistant", "b")), "d.jsonl, line 3")], max_length=20)
    assert [len(it["input_ids"]) for it in items] == [20, 6]
    out = capsys.readouterr().out
    assert "2 of 3 conversations are longer than max_length 20 tokens and were truncated (first: d.jsonl, line 1)" in out
    assert "1 kept no assistant token and were left out (first: d.jsonl, line 2)" in out
    with pytest.raises(ValueError, match="all 1 conversations have their assistant tokens past max_length 20"):
        task.encode(tokenizer, [(late_reply, "d.jsonl, line 2")], max_length=20)


def test_rouge_l() -> None:
    assert rouge_l("the cat sat", "the cat sat") == 1.0
    assert rouge_l("the cat", "the dog sat") == pytest.approx(2 * 0.5 * (1 / 3) / (0.5 + 1 / 3))
    assert rouge_l("", "x") == 0.0


def test_without_data_it_trains_on_the_chatterbot_pairs() -> None:
    config = load_config(None, ["task=instruct"])
    instruct = get_task("instruct").load_splits(config)
    chat = get_task("chat").load_splits(load_config(None, ["task=chat"]))
    assert [t for t, _ in instruct.test] == [(("user", p), ("assistant", r)) for p, r in chat.test]
    assert len(instruct.train) == len(chat.train)


def test_instruct_run_on_a_users_jsonl(tiny_llama: Path, tmp_path: Path) -> None:
    data = _jsonl(tmp_path / "mine.jsonl", _conversations(40))
    config = load_config(None, ["task=instruct", f"model={tiny_llama}", f"data.path={data}",
                                f"output={tmp_path / 'run'}", "batch_size=8", "epochs=2", "lr=1e-2",
                                "adapter.dropout=0.0", "threads=1", "tensorboard=false"])
    assert config.max_length == 256 and config.adapter_config().rank == 8  # the task's defaults
    metrics = run_training(config, progress=False)
    assert metrics["test_loss"] < metrics["base_test_loss"]
    assert metrics["test_perplexity"] < metrics["base_test_perplexity"]
    assert 0 < len(metrics["samples"]) <= 5 and 0.0 <= metrics["sample_rouge_l"] <= 1.0
    assert "base_sample_rouge_l" in metrics
    trained = load_trained(tmp_path / "run")
    rows = trained.task.predict(trained.model, trained.tokenizer,
                                [{"messages": [{"role": "user", "content": "hello"}]}, {"prompt": "hi"}],
                                trained.config, trained.labels, lambda m, b: m(**b))
    assert isinstance(rows[0]["reply"], str) and rows[1]["prompt"] == "hi"
