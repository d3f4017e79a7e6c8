"""The training loop on a tiny random BERT: what it writes, and exact resume after a crash."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt
from deltatune.train import load_config, load_trained, run_training
from deltatune.train.loop import lr_at

METRIC_KEYS = {"test_accuracy", "test_macro_f1", "majority_baseline_accuracy", "trainable_parameters",
               "total_parameters", "adapter_bytes", "train_seconds", "peak_memory_mb"}


def tiny_config(model: Path, data: Path, out: Path, *extra: str):
    return load_config(None, [f"model={model}", "task=classification", f"data.path={data}", f"output={out}",
                              "epochs=2", "batch_size=8", "lr=1e-2", "checkpoint_every=2", "eval_batch_size=7",
                              "adapter.dropout=0.1", "adapter.target=[query, value, dense]", *extra])


def test_lr_schedule_warms_up_then_decays() -> None:
    lrs = [lr_at(s, total=10, warmup=2, peak=1.0) for s in range(10)]
    assert lrs[:2] == [0.5, 1.0] and lrs[2] == 1.0 and lrs[-1] == pytest.approx(1 / 8)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))


def test_run_writes_adapter_metrics_config_and_plot(tiny_bert: Path, tiny_csv: Path, tmp_path: Path) -> None:
    metrics = run_training(tiny_config(tiny_bert, tiny_csv, tmp_path / "run"), progress=False)
    out = tmp_path / "run"
    assert METRIC_KEYS <= set(metrics) and METRIC_KEYS <= set(json.loads((out / "metrics.json").read_text()))
    assert (out / "training.png").read_bytes()[:4] == b"\x89PNG"
    assert load_config(out / "config.yaml").model_dump() == tiny_config(tiny_bert, tiny_csv, out).model_dump()
    assert [v["epoch"] for v in metrics["validation"]] == [1, 2]
    assert metrics["steps"] == 2 * 6  # 48 training texts / 8 per step, twice
    # Step times: the steps' CPU time (the work, whatever else runs) and each step's wall time, in brief.
    times = metrics["step_times"]
    assert metrics["train_cpu_seconds"] > 0 and 0 < times["first"] and 0 < times["median"] <= metrics["train_seconds"]
    # train_seconds also counts the two validations; the steps alone take less.
    assert times["mean_after_first"] * 11 + times["first"] < metrics["train_seconds"] + 0.01
    # Each step's CPU time too (plan's accuracy bench compares steady steps): they add up to the run's.
    cpu = metrics["step_cpu_times"]
    assert cpu["mean_after_first"] * 11 + cpu["first"] == pytest.approx(metrics["train_cpu_seconds"], abs=0.02)
    # The adapter holds LoRA tensors plus the new classifier head, and nothing of the frozen base.
    saved = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert any(k.startswith("classifier.") for k in saved)
    assert sum(t.numel() for t in saved.values()) == metrics["trainable_parameters"]
    assert not any("embeddings" in k for k in saved)
    assert metrics["adapter_bytes"] == sum(f.stat().st_size for f in (out / "adapter").iterdir())
    # Checkpoints are safetensors + JSON only: nothing to unpickle.
    # (one complete checkpoint, versioned by its step: the older ones go once a newer one is in place)
    assert [f.name for f in (out / "checkpoint").iterdir()] == ["step-000000012"]
    assert sorted(f.name for f in (out / "checkpoint" / "step-000000012").iterdir()) == [
        "state.json", "state.safetensors"]
    # Loading the run back gives the test accuracy the run reported.
    trained = load_trained(out)
    assert trained.labels == ["negative", "neutral", "positive"] and trained.adapter == "default"
    assert all(not p.requires_grad for p in trained.model.parameters())


def test_resume_after_a_crash_ends_bit_identical(tiny_bert: Path, tiny_csv: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    whole = run_training(tiny_config(tiny_bert, tiny_csv, tmp_path / "whole"), progress=False)

    real_step = dt.on_train_step

    def crash_at_step_9(model, step, total):  # after the checkpoint of step 8, in the second epoch
        real_step(model, step, total)
        if step == 9:
            raise KeyboardInterrupt

    monkeypatch.setattr(dt, "on_train_step", crash_at_step_9)
    config = tiny_config(tiny_bert, tiny_csv, tmp_path / "split")
    with pytest.raises(KeyboardInterrupt):
        run_training(config, progress=False)
    monkeypatch.setattr(dt, "on_train_step", real_step)
    assert json.loads((tmp_path / "split" / "checkpoint" / "step-000000008" / "state.json").read_text())["step"] == 8
    resumed = run_training(config, resume=True, progress=False)

    a = load_file(str(tmp_path / "whole" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "split" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    for key in ("test_accuracy", "test_macro_f1", "test_loss", "validation", "steps"):
        assert resumed[key] == whole[key]
    assert resumed["resumed"] is True


def test_resume_refuses_a_changed_config_or_a_missing_checkpoint(tiny_bert: Path, tiny_csv: Path,
                                                                 tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="holds no checkpoint"):
        run_training(tiny_config(tiny_bert, tiny_csv, tmp_path / "none"), resume=True, progress=False)
    run_training(tiny_config(tiny_bert, tiny_csv, tmp_path / "run", "epochs=1"), progress=False)
    with pytest.raises(ValueError, match="'lr' differs"):
        run_training(tiny_config(tiny_bert, tiny_csv, tmp_path / "run", "epochs=1", "lr=0.5"), resume=True,
                     progress=False)


def test_full_fine_tuning_saves_a_whole_model(tiny_bert: Path, tiny_csv: Path, tmp_path: Path) -> None:
    config = load_config(None, [f"model={tiny_bert}", "task=classification", f"data.path={tiny_csv}",
                                f"output={tmp_path / 'full'}", "method=full", "epochs=1", "batch_size=16"])
    metrics = run_training(config, progress=False)
    assert metrics["trainable_parameters"] == metrics["total_parameters"]
    trained = load_trained(tmp_path / "full")
    assert trained.adapter is None and trained.labels == ["negative", "neutral", "positive"]


def test_new_head_must_be_trained(tiny_bert: Path, tiny_csv: Path, tmp_path: Path) -> None:
    config = tiny_config(tiny_bert, tiny_csv, tmp_path / "run", "adapter.modules_to_save=[pooler.dense]")
    with pytest.raises(ValueError, match="'classifier' starts with random weights"):
        run_training(config, progress=False)


def test_an_adapter_saved_without_training_metadata_loads_with_overrides(tiny_bert: Path, tmp_path: Path) -> None:
    from deltatune.train import get_task, load_model

    task = get_task("classification")
    loaded = load_model(str(tiny_bert), task, ["x", "y", "z"])
    dt.attach(loaded.model, dt.LoraConfig(target=["query"], rank=2, modules_to_save=("classifier",)))
    dt.save_adapter(loaded.model, tmp_path / "plain")  # no "training" entry in adapter_config.json
    trained = load_trained(tmp_path / "plain", {"model": str(tiny_bert), "task": "sentiment"})
    assert trained.adapter == "default" and trained.config.model == str(tiny_bert)
    assert trained.model.config.num_labels == 3  # the task's labels: negative, neutral, positive


@pytest.mark.parametrize("method", ["ia3", "bitfit", "prompt"])
def test_other_methods_train_through_the_same_loop(method: str, tiny_bert: Path, tiny_csv: Path,
                                                   tmp_path: Path) -> None:
    config = load_config(None, [f"model={tiny_bert}", "task=classification", f"data.path={tiny_csv}",
                                f"output={tmp_path / method}", f"method={method}", "epochs=1", "batch_size=16"])
    metrics = run_training(config, progress=False)
    assert 0 < metrics["trainable_parameters"] < metrics["total_parameters"]
    assert load_trained(tmp_path / method).adapter == "default"


def test_methods_with_step_hooks_and_penalties_train(tiny_bert: Path, tiny_csv: Path, tmp_path: Path) -> None:
    """AdaLoRA reads gradients in its step hook and adds an orthogonality penalty to the loss."""
    config = load_config(None, [f"model={tiny_bert}", "task=classification", f"data.path={tiny_csv}",
                                f"output={tmp_path / 'ada'}", "epochs=1", "batch_size=8", "method=adalora",
                                "adapter.target=[query, value]"])
    metrics = run_training(config, progress=False)
    assert metrics["steps"] == 6 and metrics["trainable_parameters"] > 0
    trained = load_trained(tmp_path / "ada")
    assert dt.configs(trained.model)["default"].method == "adalora"
