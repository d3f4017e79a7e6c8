"""Training on a quantized base (``quantize: nf4``), the chunked loss (``loss_chunk``), reloading the
adapter onto a freshly quantized base, and ``deltatune merge --quantize``, on a tiny random Llama."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import deltatune as dt
from deltatune.train import load_config, load_trained, run_training
from deltatune.train.memory import chunked_runner
from tests.models import ZOO
from tests.train.tiny import make_tiny_llama

pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def _nf4_chat(tiny_llama: Path, tmp_path: Path, *settings: str):
    """The tiny chat run on an NF4 base that these tests train, with ``settings`` added."""
    return load_config(None, [f"model={tiny_llama}", "task=chat", "data.max_train_examples=8",
                              "data.max_eval_examples=4", "epochs=1", "batch_size=4", "lr=1e-2", "precision=fp32",
                              "threads=1", "tensorboard=false", "quantize=nf4", *settings,
                              f"output={tmp_path / 'run'}"])


@pytest.mark.parametrize("quantized", [False, True])
def test_the_chunked_loss_equals_the_models_own(quantized: bool) -> None:
    """Same loss and same adapter gradients as transformers' causal-LM loss, with a LoRA on the head too."""
    zoo = ZOO["llama"]
    batch = zoo.inputs()
    labels = batch["input_ids"].clone()
    labels[:, :3] = -100                      # a masked prompt
    labels[batch["attention_mask"] == 0] = -100
    grads = []
    for chunked in (False, True):
        model = zoo.build()
        if quantized:
            dt.quantize(model, "nf4")
        torch.manual_seed(0)
        dt.attach(model, dt.LoraConfig(target=["q_proj", "v_proj", "lm_head"], init="gaussian"))
        run = (lambda m, b: m(**b))
        out = (chunked_runner(run, 7) if chunked else run)(model, {**batch, "labels": labels})
        out.loss.backward()
        grads.append((out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
        assert isinstance(model.lm_head, dt.AdaptedLayer)  # the head is back in place
    (plain, g_plain), (chunk, g_chunk) = grads
    torch.testing.assert_close(chunk, plain, rtol=1e-5, atol=1e-6)
    for name in g_plain:
        torch.testing.assert_close(g_chunk[name], g_plain[name], rtol=1e-4, atol=1e-6, msg=name)


def test_train_on_an_nf4_base_reload_and_merge(tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from deltatune.cli import app
    from deltatune.train.chat import ChatTask

    monkeypatch.setattr(ChatTask, "samples", 0)  # no generations needed here
    config = _nf4_chat(tiny_llama, tmp_path, "loss_chunk=16", "gradient_checkpointing=true")
    metrics = run_training(config, progress=False)
    # The saved adapter on a freshly quantized base scores the test split exactly as the trained model did.
    trained = load_trained(tmp_path / "run")
    assert dt.core.layers.describe(trained.model.model.layers[0].self_attn.q_proj.base).quantized == "nf4"
    splits = trained.task.load_splits(trained.config, trained.labels)
    items = trained.task.encode(trained.tokenizer, splits.test, trained.config.max_length)
    again = trained.task.evaluate(trained.model, items, trained.tokenizer, 16, lambda m, b: m(**b))
    assert again["loss"] == pytest.approx(metrics["test_loss"], rel=1e-6)

    cli = CliRunner()
    for fmt in ("none", "nf4"):
        result = cli.invoke(app, ["merge", str(tmp_path / "run"), "--output", str(tmp_path / f"merged-{fmt}"),
                                  "--quantize", fmt], catch_exceptions=False)
        assert result.exit_code == 0, result.output
    assert "re-quantized to nf4: weight rounding error" in result.output and "max " in result.output
    meta = json.loads((tmp_path / "merged-nf4" / "deltatune_training.json").read_text())
    error = meta["requantization_error"]
    assert 0 < error["mean_abs_error"] < error["max_abs_error"] and error["layers"] == 14
    # the re-quantized model reloads quantized with plain transformers
    from transformers import AutoModelForCausalLM

    again = AutoModelForCausalLM.from_pretrained(tmp_path / "merged-nf4", device_map="cpu")
    assert dt.core.layers.describe(again.model.layers[0].self_attn.q_proj).quantized == "nf4"
    full = AutoModelForCausalLM.from_pretrained(tmp_path / "merged-none")
    assert dt.core.layers.describe(full.model.layers[0].self_attn.q_proj).quantized is None


def test_train_with_a_bf16_rest_and_reload(tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from deltatune.train.chat import ChatTask

    monkeypatch.setattr(ChatTask, "samples", 0)
    config = _nf4_chat(tiny_llama, tmp_path, "quantize_rest_dtype=bfloat16", "compute_dtype=bfloat16", "loss_chunk=16")
    metrics = run_training(config, progress=False)
    trained = load_trained(tmp_path / "run")
    assert trained.model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert dt.core.layers.describe(trained.model.model.layers[0].self_attn.q_proj.base).quantized == "nf4"
    splits = trained.task.load_splits(trained.config, trained.labels)
    items = trained.task.encode(trained.tokenizer, splits.test, trained.config.max_length)
    again = trained.task.evaluate(trained.model, items, trained.tokenizer, 16, lambda m, b: m(**b))
    assert again["loss"] == pytest.approx(metrics["test_loss"], rel=1e-6)


def test_train_with_loftq_and_reload(tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """loftq_iterations: the adapter starts from LoftQ's factors on LoftQ's base (not quant(W), not
    B = 0); the base stays bit-identical through training; load_trained rebuilds the same base and
    reproduces the test loss."""
    from deltatune.core.records import adapted_layers
    from deltatune.integrations.loftq import loftq_quantize
    from deltatune.train import run as run_module
    from deltatune.train.chat import ChatTask
    from deltatune.train.models import load_model

    monkeypatch.setattr(ChatTask, "samples", 0)
    sets = [f"model={tiny_llama}", "task=chat", "data.max_train_examples=8", "data.max_eval_examples=4", "epochs=1",
            "batch_size=4", "lr=1e-2", "precision=fp32", "threads=1", "tensorboard=false", "quantize=nf4",
            "loftq_iterations=2", "adapter.rank=4", "loss_chunk=16", f"output={tmp_path / 'run'}"]
    config = load_config(None, sets)
    # LoftQ's base and factors, computed independently on a fresh full-precision copy
    fresh = load_model(config.model, ChatTask(), None, config).model
    _, inits = loftq_quantize(fresh, config.adapter_config(), "nf4", iterations=2)
    packed = {n: m.weight.data.clone() for n, m in fresh.named_modules() if dt.core.layers.quantized_format(m)}
    started: dict[str, torch.Tensor] = {}
    models: list[torch.nn.Module] = []
    real_load = run_module._load

    def spy(*args, **kwargs):  # the adapter as training starts
        strategy, tokenizer = real_load(*args, **kwargs)
        models.append(strategy.model)
        for n, layer in adapted_layers(strategy.model):
            started[n] = layer.adapters["default"].B.detach().clone()
        return strategy, tokenizer

    monkeypatch.setattr(run_module, "_load", spy)
    metrics = run_training(config, progress=False)
    assert len(inits) == 14 and all(torch.equal(started[n], inits[n][1]) for n in inits)  # B = LoftQ's, not 0
    assert all(inits[n][1].abs().sum() > 0 for n in inits)

    def quantized(model: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {n.removesuffix(".base"): m.weight.data for n, m in model.named_modules()
                if dt.core.layers.quantized_format(m)}

    assert quantized(models[0]).keys() == packed.keys()
    assert all(torch.equal(t, packed[n]) for n, t in quantized(models[0]).items())  # trained: base untouched
    trained = load_trained(tmp_path / "run")
    assert all(torch.equal(t, packed[n]) for n, t in quantized(trained.model).items())  # rebuilt bit for bit
    assert not any("loftq" in k for k in trained.model.__dict__)  # LoftQ's starting factors are not kept
    splits = trained.task.load_splits(trained.config, trained.labels)
    items = trained.task.encode(trained.tokenizer, splits.test, trained.config.max_length)
    again = trained.task.evaluate(trained.model, items, trained.tokenizer, 16, lambda m, b: m(**b))
    assert again["loss"] == pytest.approx(metrics["test_loss"], rel=1e-6)


def test_config_checks() -> None:
    with pytest.raises(ValueError, match="full fine-tuning trains every weight"):
        load_config(None, ["method=full", "quantize=nf4"])
    with pytest.raises(ValueError, match="torchao quantizes to nf4 only"):
        load_config(None, ["quantize=int8", "quantize_backend=torchao"])
    with pytest.raises(ValueError, match="loftq_iterations initialises LoRA on a quantized base"):
        load_config(None, ["loftq_iterations=1"])
    with pytest.raises(ValueError, match="loftq_iterations initialises LoRA on a quantized base"):
        load_config(None, ["loftq_iterations=1", "quantize=nf4", "method=ia3"])
    with pytest.raises(ValueError, match="loss_chunk"):
        load_config(None, ["loss_chunk=0"])


def test_nf4_blocksize_and_full_precision_layers_train_reload_and_merge(
        tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """quantize_blocksize: 32 and quantize_skip: [v_proj] reach the base, the reloaded base and the
    re-quantized merge (which plain transformers reloads with v_proj still full precision)."""
    from deltatune.cli import app
    from deltatune.core.layers import describe
    from deltatune.train.chat import ChatTask

    monkeypatch.setattr(ChatTask, "samples", 0)
    config = _nf4_chat(tiny_llama, tmp_path, "quantize_blocksize=32", "quantize_skip=[v_proj]", "loss_chunk=16")
    metrics = run_training(config, progress=False)
    trained = load_trained(tmp_path / "run")
    attn = trained.model.model.layers[1].self_attn
    assert describe(attn.q_proj.base).quantized == "nf4" and attn.q_proj.base.weight.quant_state.blocksize == 32
    assert type(attn.v_proj.base) is torch.nn.Linear and attn.v_proj.base.weight.dtype == torch.float32
    splits = trained.task.load_splits(trained.config, trained.labels)
    items = trained.task.encode(trained.tokenizer, splits.test, trained.config.max_length)
    again = trained.task.evaluate(trained.model, items, trained.tokenizer, 16, lambda m, b: m(**b))
    assert again["loss"] == pytest.approx(metrics["test_loss"], rel=1e-6)

    result = CliRunner().invoke(app, ["merge", str(tmp_path / "run"), "--output", str(tmp_path / "merged"),
                                      "--quantize", "nf4"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    error = json.loads((tmp_path / "merged" / "deltatune_training.json").read_text())["requantization_error"]
    assert error["layers"] == 12  # 14 linear layers of the blocks less the two v_proj
    from transformers import AutoModelForCausalLM

    again = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", device_map="cpu")
    attn = again.model.layers[1].self_attn
    assert describe(attn.q_proj).quantized == "nf4" and attn.q_proj.weight.quant_state.blocksize == 32
    assert describe(attn.v_proj).quantized is None


def test_quantize_option_checks() -> None:
    with pytest.raises(ValueError, match="quantize_blocksize sets NF4's block size"):
        load_config(None, ["quantize=int8", "quantize_blocksize=32"])
    with pytest.raises(ValueError, match="an entry is empty"):
        load_config(None, ["quantize=nf4", "quantize_skip=['']"])
    with pytest.raises(ValueError, match="quantize_blocksize"):
        load_config(None, ["quantize=nf4", "quantize_blocksize=128"])
