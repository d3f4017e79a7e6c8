"""Instruction tuning a causal LM on (prompt, reply) pairs, with the loss on reply tokens only.

``chat`` reads the English chatterbot corpus (2,393 consecutive turns in 21 categories) and tunes
SmolLM2-135M-Instruct. Many prompts come with several replies ("How are you?" -> "Good." / "Fine,
and you?"), so the seeded split is made over distinct prompts: a prompt and all its replies land in
the same split, and no test prompt was seen in training.

Each example is the model's chat template around one user turn and one assistant turn; the
prompt part (system + user + the assistant header) is masked out of the loss with -100, so the
model learns to answer rather than to ask. Scores: token-weighted loss and perplexity on the
reply tokens of held-out pairs, next to the same numbers for the base model without the adapter,
plus a few greedy generations written to the run's metrics.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

import deltatune as dt
from deltatune.train import data as D
from deltatune.train.task import Task

if TYPE_CHECKING:
    from deltatune.train.schema import TrainConfig

IGNORE = -100  # label value that cross-entropy skips


def chatterbot_pairs() -> list[tuple[str, str]]:
    """Consecutive (turn, next turn) pairs from the English chatterbot corpus, in file order."""
    import yaml

    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("task 'chat' needs the chatterbot corpus: pip install --no-deps chatterbot-corpus==1.3.3")
    pairs = []
    for path in sorted((Path(spec.submodule_search_locations[0]) / "data" / "english").glob("*.yml")):
        for conversation in yaml.safe_load(path.read_text(encoding="utf-8")).get("conversations", []):
            turns = [str(t).strip() for t in conversation]
            pairs += [(a, b) for a, b in zip(turns, turns[1:]) if a and b]
    return pairs


def split_by_prompt(pairs: list[tuple[str, str]], seed: int, validation: float,
                    test: float) -> tuple[list, list, list]:
    """Drop repeated pairs, then split the distinct prompts with the seed; replies follow their prompt."""
    groups: dict[str, list[tuple[str, str]]] = {}
    seen: set[tuple[str, str]] = set()
    for prompt, reply in pairs:
        key = (D.normalise(prompt), D.normalise(reply))
        if key not in seen:
            seen.add(key)
            groups.setdefault(key[0], []).append((prompt, reply))
    train, val, test_ = D.seeded_split(list(groups.values()), seed, validation, test)
    return [p for g in train for p in g], [p for g in val for p in g], [p for g in test_ for p in g]


def encode_pair(tokenizer: Any, prompt: str, reply: str | None) -> tuple[list[int], int]:
    """Token ids of the templated conversation and how many of them are prompt (masked) tokens.

    With ``reply=None`` only the prompt with the assistant header is encoded (for generation).
    Tokenizers without a chat template get a plain ``User: ... / Assistant: ...`` layout.
    """
    user = [{"role": "user", "content": prompt}]
    if getattr(tokenizer, "chat_template", None):
        head = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
        full = (tokenizer.apply_chat_template(user + [{"role": "assistant", "content": reply}], tokenize=False)
                if reply is not None else head)
        if not full.startswith(head):  # templates that rewrite earlier turns: fall back to appending
            full = head + (reply or "") + (tokenizer.eos_token or "")
    else:
        head = f"User: {prompt}\nAssistant: "
        full = head + (reply + (tokenizer.eos_token or "") if reply is not None else "")
    head_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
    tail_ids = tokenizer(full[len(head):], add_special_tokens=False)["input_ids"] if reply is not None else []
    return head_ids + tail_ids, len(head_ids)


class ChatTask(Task):
    """Causal-LM instruction tuning on chatterbot (prompt, reply) pairs."""

    name: ClassVar[str] = "chat"
    kind: ClassVar[str] = "causal-lm"
    description: ClassVar[str] = "instruction tuning on chatterbot-corpus replies (loss on reply tokens only)"
    headline: ClassVar[str] = "loss"
    validation_metrics: ClassVar[tuple[str, ...]] = ("loss", "perplexity")
    defaults: ClassVar[dict[str, Any]] = {
        "model": "smollm2-135m", "epochs": 1, "batch_size": 8, "eval_batch_size": 16, "max_length": 96,
        "lr": 5e-4, "checkpoint_every": 50,
    }
    method_defaults: ClassVar[dict[str, dict[str, Any]]] = {
        "lora": {"target": "all-linear", "rank": 8, "alpha": 16, "dropout": 0.05},
    }
    samples: ClassVar[int] = 5  # greedy generations shown at the end of a run
    new_tokens: ClassVar[int] = 40

    def check_config(self, config: TrainConfig) -> None:
        d = config.data
        if d.path or d.train or d.validation or d.test:
            raise ValueError("task 'chat' reads the built-in chatterbot corpus; remove data.path/train/validation/test")

    def load_splits(self, config: TrainConfig, labels: list[str] | None = None) -> D.Splits:
        d = config.data
        train, val, test = split_by_prompt(chatterbot_pairs(), config.seed, d.validation_fraction, d.test_fraction)
        return D.Splits(train=D.take(train, d.max_train_examples), validation=D.take(val, d.max_eval_examples),
                        test=D.take(test, d.max_eval_examples))

    def auto_model_class(self) -> Any:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    def encode(self, tokenizer: Any, examples: list[tuple], max_length: int) -> list[dict[str, Any]]:
        items = []
        for prompt, reply, *_ in examples:
            ids, n_prompt = encode_pair(tokenizer, prompt, reply)
            ids = ids[:max_length]
            labels = [IGNORE] * min(n_prompt, len(ids)) + ids[n_prompt:]
            if any(t != IGNORE for t in labels):  # a prompt longer than max_length leaves nothing to learn
                items.append({"input_ids": ids, "labels": labels})
        return items

    def collate(self, items: list[dict[str, Any]], tokenizer: Any) -> dict[str, torch.Tensor]:
        ids = D.pad([it["input_ids"] for it in items], tokenizer.pad_token_id)   # (B, T)
        mask = D.pad([[1] * len(it["input_ids"]) for it in items], 0)           # (B, T)
        labels = D.pad([it["labels"] for it in items], IGNORE)                  # (B, T), -100 on prompt and padding
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def loss_weight(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"][:, 1:] != IGNORE).sum())  # position t predicts token t+1

    @torch.no_grad()
    def evaluate(self, model: nn.Module, items: list[dict[str, Any]], tokenizer: Any, batch_size: int,
                 run: Any) -> dict[str, float]:
        """Loss per reply token over all items (not a mean of batch means), and its perplexity."""
        total, count = 0.0, 0
        for idx in D.length_sorted_batches([len(it["input_ids"]) for it in items], batch_size):
            batch = self.collate([items[i] for i in idx], tokenizer)
            labels = batch.pop("labels")
            logits = run(model, batch).logits.float().cpu()                     # (B, N + T, V)
            logits = logits[:, logits.shape[1] - labels.shape[1]:]  # (B, T, V): virtual tokens (N) come first
            # position t predicts token t+1
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE,
                                   reduction="sum")
            total += loss.item()
            count += int((labels[:, 1:] != IGNORE).sum())
        mean = total / max(count, 1)
        return {"loss": mean, "perplexity": math.exp(min(mean, 50.0))}

    def final_metrics(self, model: nn.Module, splits: D.Splits, encoded: dict[str, list], tokenizer: Any,
                      config: TrainConfig, run: Any) -> dict[str, Any]:
        metrics = super().final_metrics(model, splits, encoded, tokenizer, config, run)
        prompts = [(p, r) for p, r in splits.test[: self.samples]]
        if dt.configs(model):  # an adapter: the base model alone is the baseline
            with dt.disabled(model):
                base = self.evaluate(model, encoded["test"], tokenizer, config.eval_batch_size, run)
                base_replies = self.generate(model, tokenizer, [p for p, _ in prompts], config)
            metrics["base_test_loss"], metrics["base_test_perplexity"] = base["loss"], base["perplexity"]
        else:
            base_replies = [None] * len(prompts)
        replies = self.generate(model, tokenizer, [p for p, _ in prompts], config)
        metrics["samples"] = [{"prompt": p, "reference": r, "reply": out, "base_reply": b}
                              for (p, r), out, b in zip(prompts, replies, base_replies)]
        return metrics

    def summary(self, metrics: dict[str, Any]) -> str:
        line = f"test reply loss {metrics['test_loss']:.4f} (perplexity {metrics['test_perplexity']:.2f})"
        if "base_test_loss" in metrics:
            line += f"; base model: {metrics['base_test_loss']:.4f} (perplexity {metrics['base_test_perplexity']:.2f})"
        shown = [f"  > {s['prompt']}\n    {s['reply']}" for s in metrics.get("samples", [])[:3]]
        return "\n".join([line, *shown])

    @torch.no_grad()
    def generate(self, model: nn.Module, tokenizer: Any, prompts: list[str], config: TrainConfig) -> list[str]:
        """Greedy replies, one prompt at a time (no padding questions), cut at end of turn."""
        device = next(model.parameters()).device
        replies = []
        for prompt in prompts:
            ids, _ = encode_pair(tokenizer, prompt, None)
            out = model.generate(torch.tensor([ids], device=device), attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
                                 max_new_tokens=self.new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            replies.append(tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip())
        return replies

    def input_field(self, records: list[dict[str, Any]], config: TrainConfig) -> str:
        return "prompt" if all("prompt" in r for r in records) else "text"

    def predict(self, model: nn.Module, tokenizer: Any, records: list[dict[str, Any]], config: TrainConfig,
                labels: list[str] | None, run: Any) -> list[dict[str, Any]]:
        key = self.input_field(records, config)
        if not all(isinstance(r.get(key), str) for r in records):
            raise ValueError("every input record needs a string 'prompt' (or 'text') field")
        prompts = [str(r[key]) for r in records]
        return [{"prompt": p, "reply": out} for p, out in zip(prompts, self.generate(model, tokenizer, prompts, config))]
