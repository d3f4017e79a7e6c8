"""Instruction tuning on the user's own conversations: ``task: instruct``.

The data is JSONL (``data.path``, split with the seed, or ``data.train`` / ``validation`` /
``test``), one conversation per line, in either common shape::

    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "..."}, ...]}          # OpenAI style, multi-turn
    {"prompt": "...", "response": "...", "system": "..."}               # system optional

Without data the task trains on the built-in chatterbot corpus (what ``task: chat`` trains on),
so the chatterbot job is one data set of this task.

Each conversation is rendered with the model's chat template (``User: / Assistant:`` lines for
a tokenizer without one) turn by turn: every token of an assistant turn's content and its end of
turn is a target; system and user turns and the assistant headers are masked (-100), so the loss
is on assistant tokens only. Batches are length-bucketed (``data.epoch_batches`` sorts each pool
of batches by length), so short conversations are not padded to long ones.

Bad data is reported with its file and line before any model work: a line that is neither shape,
a role other than system / user / assistant, a conversation without an assistant turn. An
example longer than ``max_length`` is truncated, and the count is printed; one whose assistant
tokens all fall past ``max_length`` is left out and counted; if that leaves nothing, it is an error.

Scores: reply loss and perplexity on the held-out conversations' assistant tokens, against the
base model with the adapter off; a few greedy generations for the last assistant turn of test
conversations, with ROUGE-L F1 against the reference reply (word-level LCS).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

import deltatune as dt
from deltatune.train import data as D
from deltatune.train.chat import IGNORE, ChatTask, chatterbot_pairs, split_by_prompt
from deltatune.train.task import Task

if TYPE_CHECKING:
    from deltatune.train.schema import TrainConfig

ROLES = ("system", "user", "assistant")
Conversation = tuple[tuple[str, str], ...]  # ((role, content), ...)


def _say(message: str) -> None:
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank encodes; one reports
        print(message)


# --- reading -----------------------------------------------------------------------------------


def parse_record(record: dict[str, Any], where: str) -> Conversation:
    """One JSONL record as ``((role, content), ...)``; anything else is a ``ValueError`` naming ``where``."""
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"{where}: 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects")
        turns = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f"{where}: message {i} must be an object with string 'role' and 'content'")
            if m["role"] not in ROLES:
                raise ValueError(f"{where}: message {i} has role {m['role']!r}; the chat template knows "
                                 f"{', '.join(ROLES)}")
            turns.append((m["role"], m["content"]))
    elif "prompt" in record and "response" in record:
        for key in ("prompt", "response", "system"):
            if key in record and not isinstance(record[key], str):
                raise ValueError(f"{where}: {key!r} is {record[key]!r}, not a string")
        turns = ([("system", record["system"])] if record.get("system") else []) + [
            ("user", record["prompt"]), ("assistant", record["response"])]
    else:
        raise ValueError(f"{where}: expected {{\"messages\": [...]}} or {{\"prompt\": ..., \"response\": ...}}, "
                         f"got keys {', '.join(record) or 'none'}")
    roles = [r for r, _ in turns]
    if "assistant" not in roles:
        raise ValueError(f"{where}: the conversation has no assistant turn, so nothing to learn; add one or remove it")
    if "user" not in roles[:roles.index("assistant")]:
        raise ValueError(f"{where}: the first assistant turn has no user turn before it")
    return tuple(turns)


def read_conversations(path: str | Path) -> list[tuple[Conversation, str]]:
    """(conversation, "file, line N") for every line of a JSONL file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data file {path} not found")
    if path.suffix.lower() not in D.JSON_SUFFIXES:
        raise ValueError(f"{path}: task instruct reads JSONL (.jsonl), one conversation per line")
    records = D.numbered_records(path)
    if not records:
        raise ValueError(f"{path} holds no conversations")
    return [(parse_record(record, f"{path}, line {line}"), f"{path}, line {line}") for line, record in records]


def dedupe_conversations(rows: list[tuple[Conversation, str]]) -> list[tuple[Conversation, str]]:
    seen: set[str] = set()
    out = []
    for conv, where in rows:
        key = json.dumps([(r, D.normalise(c)) for r, c in conv])
        if key not in seen:
            seen.add(key)
            out.append((conv, where))
    return out


# --- templating --------------------------------------------------------------------------------


def render(tokenizer: Any, turns: Conversation, generation_prompt: bool) -> str:
    """The conversation as text: the model's chat template, or ``Role: content`` lines without one."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": r, "content": c} for r, c in turns]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
    eos = tokenizer.eos_token or ""
    text = "".join(f"{r.capitalize()}: {c}{eos if r == 'assistant' else ''}\n" for r, c in turns)
    return text + ("Assistant: " if generation_prompt else "")


def encode_conversation(tokenizer: Any, turns: Conversation, where: str = "") -> tuple[list[int], list[int]]:
    """Token ids and labels: assistant contents (and their end of turn) are targets, the rest -100.

    The template is rendered for each growing prefix of the conversation, so each piece of text is
    what the template adds for one turn (and, before an assistant turn, its header).
    """
    ids: list[int] = []
    labels: list[int] = []
    prev = ""
    for i, (role, _) in enumerate(turns):
        try:
            if role == "assistant":
                head = render(tokenizer, turns[:i], True)
                full = render(tokenizer, turns[:i + 1], False)
                pieces = [(head, False), (full, True)]
            else:
                full = render(tokenizer, turns[:i + 1], False)
                pieces = [(full, False)]
        except Exception as err:  # jinja's TemplateError: e.g. a template that allows no system turn
            raise ValueError(f"{where}: the chat template rejects this conversation ({err})") from None
        for text, trained in pieces:
            if not text.startswith(prev):
                raise ValueError(f"{where}: the model's chat template rewrites earlier turns when a turn is added, "
                                 "so assistant tokens cannot be located; use a model with a prefix-stable template")
            t = tokenizer(text[len(prev):], add_special_tokens=False)["input_ids"] if len(text) > len(prev) else []
            ids += t
            labels += t if trained else [IGNORE] * len(t)
            prev = text
    return ids, labels


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 on lower-cased words: the longest common subsequence against both lengths."""
    a, b = candidate.lower().split(), reference.lower().split()
    if not a or not b:
        return 0.0
    row = [0] * (len(b) + 1)
    for x in a:
        prev_diag = 0
        for j, y in enumerate(b, 1):
            keep = row[j]
            row[j] = prev_diag + 1 if x == y else max(row[j], row[j - 1])
            prev_diag = keep
    lcs = row[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


# --- the task ----------------------------------------------------------------------------------


class InstructTask(ChatTask):
    """Causal-LM instruction tuning on the user's JSONL conversations (or the chatterbot pairs)."""

    name: ClassVar[str] = "instruct"
    description: ClassVar[str] = ("instruction tuning on your JSONL conversations (messages, or prompt/response), "
                                  "loss on assistant tokens; chatterbot pairs without data")
    defaults: ClassVar[dict[str, Any]] = {
        "model": "smollm2-135m", "epochs": 1, "batch_size": 8, "eval_batch_size": 16, "max_length": 256,
        "lr": 5e-4, "checkpoint_every": 50,
    }

    def check_config(self, config: TrainConfig) -> None:
        d = config.data
        D.check_data_files(d)

    def load_splits(self, config: TrainConfig, labels: list[str] | None = None) -> D.Splits:
        d = config.data
        if d.path:
            train, val, test = D.seeded_split(dedupe_conversations(read_conversations(d.path)), config.seed,
                                              d.validation_fraction, d.test_fraction)
        elif d.train:
            assert d.validation and d.test
            train, val, test = (read_conversations(p) for p in (d.train, d.validation, d.test))
        else:  # the built-in data set: the chatterbot pairs, split by prompt as task chat splits them
            parts = split_by_prompt(chatterbot_pairs(), config.seed, d.validation_fraction, d.test_fraction)
            train, val, test = ([((("user", p), ("assistant", r)), "chatterbot") for p, r in part] for part in parts)
        return D.Splits(train=D.take(train, d.max_train_examples), validation=D.take(val, d.max_eval_examples),
                        test=D.take(test, d.max_eval_examples))

    def encode(self, tokenizer: Any, examples: list[tuple], max_length: int) -> list[dict[str, Any]]:
        items, truncated, dropped = [], [], []
        for turns, where in examples:
            ids, labels = encode_conversation(tokenizer, turns, where)
            if len(ids) > max_length:
                truncated.append(where)
                ids, labels = ids[:max_length], labels[:max_length]
            if all(t == IGNORE for t in labels[1:]):  # label 0 is never predicted (nothing precedes it)
                dropped.append(where)
                continue
            items.append({"input_ids": ids, "labels": labels})
        if examples and not items:
            raise ValueError(f"all {len(examples)} conversations have their assistant tokens past max_length "
                             f"{max_length} (e.g. {examples[0][1]}); raise max_length")
        if truncated:
            _say(f"instruct: {len(truncated)} of {len(examples)} conversations are longer than max_length "
                 f"{max_length} tokens and were truncated (first: {truncated[0]})"
                 + (f"; {len(dropped)} kept no assistant token and were left out (first: {dropped[0]})"
                    if dropped else "") + "; raise max_length to keep them whole")
        return items

    def final_metrics(self, model: nn.Module, splits: D.Splits, encoded: dict[str, list], tokenizer: Any,
                      config: TrainConfig, run: Any) -> dict[str, Any]:
        metrics = Task.final_metrics(self, model, splits, encoded, tokenizer, config, run)
        chosen = [turns for turns, _ in splits.test[: self.samples]]
        prompts = [turns[:max(i for i, (r, _) in enumerate(turns) if r == "assistant")] for turns in chosen]
        references = [turns[len(p)][1] for turns, p in zip(chosen, prompts)]
        base_replies: list[str | None] = [None] * len(prompts)
        if dt.configs(model):  # an adapter: the base model alone is the baseline
            with dt.disabled(model):
                base = self.evaluate(model, encoded["test"], tokenizer, config.eval_batch_size, run)
                base_replies = list(self.generate_turns(model, tokenizer, prompts))
            metrics["base_test_loss"], metrics["base_test_perplexity"] = base["loss"], base["perplexity"]
        replies = self.generate_turns(model, tokenizer, prompts)
        metrics["samples"] = [{"prompt": p[-1][1], "reference": ref, "reply": out, "base_reply": b}
                              for p, ref, out, b in zip(prompts, references, replies, base_replies)]
        if prompts:
            metrics["sample_rouge_l"] = sum(rouge_l(o, r) for o, r in zip(replies, references)) / len(prompts)
            if base_replies[0] is not None:
                metrics["base_sample_rouge_l"] = sum(rouge_l(str(o), r) for o, r in zip(base_replies, references)) \
                    / len(prompts)
        return metrics

    def summary(self, metrics: dict[str, Any]) -> str:
        line = super().summary(metrics)
        if "sample_rouge_l" in metrics:
            base = (f" (base {metrics['base_sample_rouge_l']:.3f})" if "base_sample_rouge_l" in metrics else "")
            line += f"\nROUGE-L of {len(metrics['samples'])} sample replies: {metrics['sample_rouge_l']:.3f}{base}"
        return line

    @torch.no_grad()
    def generate_turns(self, model: nn.Module, tokenizer: Any, prompts: list[Conversation]) -> list[str]:
        """Greedy replies to each conversation (the assistant turn that follows it)."""
        device = next(model.parameters()).device
        replies = []
        for turns in prompts:
            ids = tokenizer(render(tokenizer, turns, True), add_special_tokens=False)["input_ids"]
            out = model.generate(torch.tensor([ids], device=device),
                                 attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
                                 max_new_tokens=self.new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            replies.append(tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip())
        return replies

    def input_field(self, records: list[dict[str, Any]], config: TrainConfig) -> str:
        return "messages" if all("messages" in r for r in records) else super().input_field(records, config)

    def predict(self, model: nn.Module, tokenizer: Any, records: list[dict[str, Any]], config: TrainConfig,
                labels: list[str] | None, run: Any) -> list[dict[str, Any]]:
        """A reply to each record: ``{"messages": [...]}`` or ``{"prompt": ..., "system": ...}`` (or ``text``)."""
        prompts = []
        for i, r in enumerate(records):
            where = f"input record {i + 1}"
            if "messages" in r:
                messages = r["messages"] if isinstance(r["messages"], list) else None
                turns = parse_record({"messages": [*(messages or [None]), {"role": "assistant", "content": ""}]}, where)
            else:
                text = r.get("prompt", r.get("text"))
                if not isinstance(text, str):
                    raise ValueError(f"{where}: needs 'messages', or a string 'prompt' (or 'text')")
                turns = parse_record({"prompt": text, "response": "", **({"system": r["system"]} if "system" in r else {})},
                                     where)
            prompts.append(turns[:-1])
        replies = self.generate_turns(model, tokenizer, prompts)
        return [{**({"messages": r["messages"]} if "messages" in r else {"prompt": p[-1][1]}), "reply": out}
                for r, p, out in zip(records, prompts, replies)]
