"""Continued pretraining on the user's own text, for domain adaptation: ``task: text``.

``data.path`` is a folder (every ``.txt``, ``.md``, ``.rst`` and source file under it), one such
file, or a JSONL file whose ``text`` field (``data.text_column``) holds one document per line.
Documents are split with the seed (a document lands in one split, so held-out perplexity is on
text the model never saw), then each split is tokenised, documents joined with the end-of-text
token, and packed into blocks of exactly ``max_length`` tokens: no padding, except the one
shorter block at the end of a split. Every token is a target. (Blocks may span two documents;
the end-of-text token between them is what the model learns to see as a boundary.)

Without data the task shows the point on something every Python ships: SmolLM2-135M-Instruct
adapted to Python code, trained on part of the standard library's own top-level modules and
scored by perplexity on *other* modules, against the unadapted base. ``data.max_train_examples``
and ``data.max_eval_examples`` count blocks here (the default caps keep a run to minutes on a CPU).
"""

from __future__ import annotations

import sysconfig
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

import deltatune as dt
from deltatune.train import data as D
from deltatune.train.chat import ChatTask
from deltatune.train.task import Task

if TYPE_CHECKING:
    from deltatune.train.schema import TrainConfig

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".pyi", ".js", ".ts", ".java", ".c", ".h", ".cc", ".cpp", ".hpp",
                 ".go", ".rs", ".rb", ".php", ".cs", ".swift", ".kt", ".scala", ".sh", ".sql", ".html", ".css",
                 ".tex", ".yaml", ".yml", ".toml", ".json")
# Not code a reader of the standard library would call representative: rot13 prose and an alphabet table.
STDLIB_SKIP = {"this.py", "antigravity.py", "__phello__.foo.py"}


class Documents(list):
    """A split's documents, ``(text, where)``, with the number of blocks to keep after packing."""

    block_limit: int | None = None


def _documents(items: list[tuple[str, str]], limit: int | None) -> Documents:
    docs = Documents(items)
    docs.block_limit = limit
    return docs


def read_documents(path: str | Path, text_column: str = "text") -> list[tuple[str, str]]:
    """(text, where) for a folder of text files, one text file, or a JSONL file's ``text_column``."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise ValueError(f"{path} holds no text files ({', '.join(TEXT_SUFFIXES[:6])}, ... source files)")
        docs = [(_read_text(f), str(f)) for f in files]
    elif path.is_file() and path.suffix.lower() in D.JSON_SUFFIXES:
        docs = []
        for line, record in D.numbered_records(path):
            value = record.get(text_column)
            if not isinstance(value, str):
                raise ValueError(f"{path}, line {line}: no string {text_column!r} field; every line needs one "
                                 "(or set data.text_column)")
            docs.append((value, f"{path}, line {line}"))
    elif path.is_file():
        docs = [(_read_text(path), str(path))]
    else:
        raise ValueError(f"data.path {path} not found; give a folder of text files, a text file or a JSONL file")
    docs = [(text, where) for text, where in docs if text.strip()]
    if not docs:
        raise ValueError(f"{path}: every document is empty")
    return docs


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    if b"\0" in raw[:4096]:
        raise ValueError(f"{path} looks binary (it holds NUL bytes); remove it from the folder")
    return raw.decode("utf-8", errors="replace")


def stdlib_modules() -> list[Path]:
    """The standard library's top-level modules (``*.py`` beside ``os.py``), sorted by name."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.name not in STDLIB_SKIP)
    if not files:
        raise ValueError(f"no Python standard library sources under {root}; give data.path")
    return files


def pack(token_lists: list[list[int]], separator: int | None, block: int, limit: int | None = None) -> list[list[int]]:
    """Join documents (``separator`` after each) and cut into ``block``-token blocks; the last may be short."""
    stream: list[int] = []
    blocks: list[list[int]] = []
    for ids in token_lists:
        stream += ids + ([separator] if separator is not None else [])
        while len(stream) >= block:
            blocks.append(stream[:block])
            stream = stream[block:]
            if limit is not None and len(blocks) >= limit:
                return blocks
    if len(stream) > 1:
        blocks.append(stream)
    return blocks


class TextTask(ChatTask):
    """Causal-LM continued pretraining on packed blocks of the user's documents (or stdlib source)."""

    name: ClassVar[str] = "text"
    description: ClassVar[str] = ("continued pretraining on a folder of text/source files or a JSONL text field, "
                                  "packed into blocks; default: SmolLM2 on Python stdlib source")
    defaults: ClassVar[dict[str, Any]] = {
        "model": "smollm2-135m", "epochs": 1, "batch_size": 8, "eval_batch_size": 8, "max_length": 256,
        "lr": 2e-3, "checkpoint_every": 50, "lr_schedule": "cosine",
    }
    method_defaults: ClassVar[dict[str, dict[str, Any]]] = {
        "lora": {"target": "all-linear", "rank": 16, "alpha": 32, "dropout": 0.0},
    }
    #: The built-in default's caps, in blocks (with max_length 256: 96k training tokens, 12k held out).
    builtin_train_blocks: ClassVar[int] = 384
    builtin_eval_blocks: ClassVar[int] = 48

    def check_config(self, config: TrainConfig) -> None:
        d = config.data
        if d.train or d.validation or d.test:
            raise ValueError("task 'text' splits data.path by document with the seed; give data.path only")

    def load_splits(self, config: TrainConfig, labels: list[str] | None = None) -> D.Splits:
        d = config.data
        if d.path:
            docs = read_documents(d.path, d.text_column)
            train_cap, eval_cap = d.max_train_examples, d.max_eval_examples
        else:
            docs = [(_read_text(p), str(p)) for p in stdlib_modules()]
            train_cap = d.max_train_examples or self.builtin_train_blocks
            eval_cap = d.max_eval_examples or self.builtin_eval_blocks
        train, val, test = D.seeded_split(docs, config.seed, d.validation_fraction, d.test_fraction)
        return D.Splits(train=_documents(train, train_cap), validation=_documents(val, eval_cap),
                        test=_documents(test, eval_cap))

    def encode(self, tokenizer: Any, examples: list[tuple], max_length: int) -> list[dict[str, Any]]:
        limit = getattr(examples, "block_limit", None)
        separator = tokenizer.eos_token_id
        ids: list[list[int]] = []
        used = 0
        for text, _ in examples:  # tokenise only as much as the cap needs
            ids.append(tokenizer(text, add_special_tokens=False)["input_ids"])
            used += len(ids[-1]) + 1
            if limit is not None and used >= limit * max_length:
                break
        return [{"input_ids": b, "labels": list(b)} for b in pack(ids, separator, max_length, limit)]

    def final_metrics(self, model: nn.Module, splits: D.Splits, encoded: dict[str, list], tokenizer: Any,
                      config: TrainConfig, run: Any) -> dict[str, Any]:
        metrics = Task.final_metrics(self, model, splits, encoded, tokenizer, config, run)
        metrics["test_tokens"] = sum(len(it["input_ids"]) - 1 for it in encoded["test"])
        metrics["train_tokens"] = sum(len(it["input_ids"]) for it in encoded["train"])
        if dt.configs(model):
            with dt.disabled(model):
                base = self.evaluate(model, encoded["test"], tokenizer, config.eval_batch_size, run)
            metrics["base_test_loss"], metrics["base_test_perplexity"] = base["loss"], base["perplexity"]
            metrics["perplexity_reduction"] = 1.0 - metrics["test_perplexity"] / base["perplexity"]
        return metrics

    def summary(self, metrics: dict[str, Any]) -> str:
        line = (f"held-out loss {metrics['test_loss']:.4f} (perplexity {metrics['test_perplexity']:.3f}) "
                f"on {metrics['test_tokens']:,} tokens")
        if "base_test_perplexity" in metrics:
            line += (f"; base model: perplexity {metrics['base_test_perplexity']:.3f} "
                     f"({100 * metrics['perplexity_reduction']:.1f}% lower after training)")
        return line

    def input_field(self, records: list[dict[str, Any]], config: TrainConfig) -> str:
        return "text"

    @torch.no_grad()
    def predict(self, model: nn.Module, tokenizer: Any, records: list[dict[str, Any]], config: TrainConfig,
                labels: list[str] | None, run: Any) -> list[dict[str, Any]]:
        """A greedy continuation of each record's ``text``."""
        device = next(model.parameters()).device
        rows = []
        for i, r in enumerate(records):
            if not isinstance(r.get("text"), str):
                raise ValueError(f"input record {i + 1}: needs a string 'text' field to continue")
            ids = tokenizer(r["text"], add_special_tokens=False)["input_ids"][-config.max_length:] or [
                tokenizer.eos_token_id]
            out = model.generate(torch.tensor([ids], device=device),
                                 attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
                                 max_new_tokens=self.new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            rows.append({"text": r["text"], "continuation": tokenizer.decode(out[0, len(ids):],
                                                                            skip_special_tokens=True)})
        return rows


__all__ = ["TextTask", "pack", "read_documents", "stdlib_modules"]
