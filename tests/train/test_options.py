"""Training options: LR schedules, gradient accumulation, gradient checkpointing, early stopping,
``eval_every`` and TensorBoard event logs, each on a tiny random model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from deltatune.train import load_config, load_trained, run_training
from deltatune.train.options import enable_gradient_checkpointing, lr_at
from tests.train.tiny import make_tiny_bert, make_tiny_llama


@pytest.fixture(scope="module")
def still_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """No dropout in the base: micro-batches draw other masks than one batch would."""
    return make_tiny_bert(tmp_path_factory.mktemp("still-bert"), dropout=0.0)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def _bert_config(model: Path, data: Path, out: Path, *extra: str):
    return load_config(None, [f"model={model}", "task=classification", f"data.path={data}", f"output={out}",
                              "epochs=1", "lr=1e-2", "adapter.dropout=0.0", "precision=fp32", "threads=1",
                              "tensorboard=false", *extra])


def test_lr_schedules() -> None:
    linear = [lr_at(s, 10, 2, 1.0, "linear") for s in range(10)]
    cosine = [lr_at(s, 10, 2, 1.0, "cosine") for s in range(10)]
    constant = [lr_at(s, 10, 2, 1.0, "constant") for s in range(10)]
    assert linear[:3] == [0.5, 1.0, 1.0] and cosine[:3] == [0.5, 1.0, 1.0] and constant == [0.5, 1.0] + [1.0] * 8
    assert linear[-1] == pytest.approx(1 / 8)
    assert cosine[6] == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))  # half way down: 0.5
    assert all(a >= b for a, b in zip(cosine[1:], cosine[2:])) and cosine[-1] < linear[-1]
    assert lr_at(0, 10, 0, 1.0, "cosine") == 1.0  # no warm-up


def test_warmup_steps_overrides_the_ratio(tiny_bert: Path, tiny_csv: Path, tmp_path: Path) -> None:
    config = _bert_config(tiny_bert, tiny_csv, tmp_path / "r", "batch_size=8", "warmup_steps=3",
                          "lr_schedule=constant", "tensorboard=true")
    run_training(config, progress=False)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "r" / "tensorboard"))
    events.Reload()
    lrs = [e.value for e in events.Scalars("train/lr")]
    assert lrs == pytest.approx([1e-2 / 3, 2e-2 / 3, 1e-2, 1e-2, 1e-2, 1e-2])  # 48 texts / 8: six steps


def test_gradient_accumulation_equals_one_big_batch(still_bert: Path, tiny_csv: Path, tmp_path: Path) -> None:
    """4 micro-batches of 2 give the adapter one batch of 8 gives (same examples per step)."""
    big = run_training(_bert_config(still_bert, tiny_csv, tmp_path / "big", "batch_size=8"), progress=False)
    acc = run_training(_bert_config(still_bert, tiny_csv, tmp_path / "acc", "batch_size=2",
                                    "gradient_accumulation=4"), progress=False)
    assert acc["steps"] == big["steps"] == 6
    a, b = _adapter(tmp_path / "big"), _adapter(tmp_path / "acc")
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6, msg=name)


def test_gradient_accumulation_weights_causal_lm_tokens(tiny_llama: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Replies differ in length: each micro-batch counts by its reply tokens, not by its examples."""
    common = [f"model={tiny_llama}", "task=chat", "data.max_train_examples=16", "data.max_eval_examples=4",
              "epochs=1", "lr=1e-2", "adapter.dropout=0.0", "precision=fp32", "threads=1", "tensorboard=false"]
    load = lambda out, *extra: load_config(None, [*common, f"output={tmp_path / out}", *extra])  # noqa: E731
    from deltatune.train.chat import ChatTask

    monkeypatch.setattr(ChatTask, "samples", 0)  # no generations needed here
    run_training(load("big", "batch_size=8"), progress=False)
    run_training(load("acc", "batch_size=2", "gradient_accumulation=4"), progress=False)
    a, b = _adapter(tmp_path / "big"), _adapter(tmp_path / "acc")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6, msg=name)


def test_gradient_checkpointing_gives_the_same_adapter(tiny_llama: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    common = [f"model={tiny_llama}", "task=chat", "data.max_train_examples=8", "data.max_eval_examples=2",
              "epochs=1", "batch_size=4", "lr=1e-2", "adapter.dropout=0.1", "precision=fp32", "threads=1",
              "tensorboard=false"]
    from deltatune.train.chat import ChatTask

    monkeypatch.setattr(ChatTask, "samples", 0)
    run_training(load_config(None, [*common, f"output={tmp_path / 'plain'}"]), progress=False)
    run_training(load_config(None, [*common, f"output={tmp_path / 'ckpt'}", "gradient_checkpointing=true"]),
                 progress=False)
    a, b = _adapter(tmp_path / "plain"), _adapter(tmp_path / "ckpt")
    for name in a:  # dropout replays the same masks in the recomputation
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=name)
    with pytest.raises(ValueError, match="gradient_checkpointing: Linear does not support it"):
        enable_gradient_checkpointing(nn.Linear(2, 2))


def test_early_stopping_keeps_the_best_adapter(tiny_bert: Path, tiny_csv: Path, tmp_path: Path) -> None:
    """Validation every step; one validation without a better loss stops; the saved adapter is the best."""
    config = _bert_config(tiny_bert, tiny_csv, tmp_path / "es", "batch_size=4", "epochs=3", "lr=0.5",
                          "eval_every=1", "early_stopping_patience=1", "early_stopping_metric=loss",
                          "tensorboard=true")
    metrics = run_training(config, progress=False)
    best = metrics["early_stopping"]
    assert best["stopped_early"] and metrics["steps"] < 3 * 12
    losses = [v["loss"] for v in metrics["validation"]]
    assert best["value"] == min(losses) and losses[-1] >= best["value"]
    assert metrics["validation"][-1]["step"] == metrics["steps"] and best["step"] < metrics["steps"]
    # The saved adapter scores the best validation loss again.
    trained = load_trained(tmp_path / "es")
    splits = trained.task.load_splits(trained.config, trained.labels)
    items = trained.task.encode(trained.tokenizer, splits.validation, trained.config.max_length)
    again = trained.task.evaluate(trained.model, items, trained.tokenizer, 16, lambda m, b: m(**b))
    assert again["loss"] == pytest.approx(best["value"], rel=1e-5)
    # TensorBoard has every step's loss and every validation.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "es" / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/lr", "validation/loss", "validation/accuracy"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, metrics["steps"] + 1))
    assert [e.value for e in events.Scalars("validation/loss")] == pytest.approx(losses)
    assert json.loads((tmp_path / "es" / "metrics.json").read_text())["early_stopping"] == best


def test_early_stopping_on_an_unknown_metric_names_the_known_ones(tiny_bert: Path, tiny_csv: Path,
                                                                   tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'bleu' is not a validation metric .*accuracy"):  # with the config, before the run
        _bert_config(tiny_bert, tiny_csv, tmp_path / "x", "batch_size=8", "early_stopping_patience=2",
                     "early_stopping_metric=bleu")
    with pytest.raises(ValueError, match="early_stopping_metric needs early_stopping_patience"):
        _bert_config(tiny_bert, tiny_csv, tmp_path / "y", "early_stopping_metric=loss")
