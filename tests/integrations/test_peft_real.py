"""PEFT round trips on real pretrained models, and the command line's PEFT paths.

all-MiniLM-L6-v2 and SmolLM2-135M (its GGUF converted once to a cached safetensors copy by
``deltatune.train.models.smollm2_dir``): PEFT trains a few steps and saves, deltatune loads and must
give PEFT's outputs; then deltatune trains, saves in PEFT's format, and PEFT must give deltatune's.
"""

from __future__ import annotations

import json

import peft  # test-only dependency (the dev extra): the reference implementation
import pytest
import torch

import deltatune as dt
from tests.integrations.test_peft_format import ATOL


def _train_steps(model: torch.nn.Module, batch: dict, loss_of, steps: int = 3) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-3)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        loss_of(model(**batch)).backward()
        opt.step()
    model.eval()


def _real_model_round_trip(model, batch, loss_of, output, peft_cfg, ours_cfg, tmp_path) -> dict[str, float]:
    """Train in PEFT, load in deltatune; train in deltatune, load in PEFT. One base model object throughout."""
    base = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        plain = output(model(**batch))
    wrapped = peft.get_peft_model(model, peft_cfg)
    _train_steps(wrapped, batch, loss_of)
    with torch.no_grad():
        theirs = output(wrapped(**batch))
    assert (theirs - plain).abs().max() > 1e-3  # training moved the outputs: the comparison means something
    wrapped.save_pretrained(tmp_path / "peft")
    model = wrapped.unload()  # the same base object, LoRA layers removed
    assert all(torch.equal(base[k], v) for k, v in model.state_dict().items())
    dt.load_adapter(model, tmp_path / "peft")
    with torch.no_grad():
        gaps = {"peft->deltatune": (output(model(**batch)) - theirs).abs().max().item()}
    dt.detach(model)

    dt.attach(model, ours_cfg)
    _train_steps(model, batch, loss_of)
    with torch.no_grad():
        ours = output(model(**batch))
    assert (ours - plain).abs().max() > 1e-3
    dt.save_adapter(model, tmp_path / "ours", format="peft")
    dt.detach(model)
    loaded = peft.PeftModel.from_pretrained(model, tmp_path / "ours").eval()
    with torch.no_grad():
        gaps["deltatune->peft"] = (output(loaded(**batch)) - ours).abs().max().item()
    return gaps


@pytest.mark.slow
def test_all_minilm_l6_v2_round_trips_both_ways(tmp_path):
    from transformers import AutoModel, AutoTokenizer

    from deltatune.train.models import minilm_dir

    model = AutoModel.from_pretrained(minilm_dir()).eval()
    batch = dict(AutoTokenizer.from_pretrained(minilm_dir())(
        ["deltatune reads PEFT checkpoints.", "What a lovely day!"], padding=True, return_tensors="pt"))
    gaps = _real_model_round_trip(
        model, batch, lambda out: out.last_hidden_state.pow(2).mean(), lambda out: out.last_hidden_state,
        peft.LoraConfig(target_modules=["query", "value", "dense"], r=8, lora_alpha=16, use_dora=True),
        dt.LoraConfig(target=["query", "key", "value", "word_embeddings"], rank=8, rslora=True), tmp_path)
    assert max(gaps.values()) < 1e-5, gaps  # seen: 1e-6 (hidden states of size ~1)


@pytest.mark.slow
def test_smollm2_135m_round_trips_both_ways(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deltatune.train.models import smollm2_dir  # converted once from the GGUF, then cached

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    batch = dict(tokenizer(["The capital of France is Paris."], return_tensors="pt"))
    batch["labels"] = batch["input_ids"]
    gaps = _real_model_round_trip(
        model, batch, lambda out: out.loss, lambda out: out.logits,
        peft.LoraConfig(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8, task_type="CAUSAL_LM"),
        dt.LoraConfig(target=["q_proj", "o_proj"], layers=list(range(0, 30, 3)), rank=4, alpha=8), tmp_path)
    assert max(gaps.values()) < 1e-4, gaps  # seen: 0 (logits of size ~10)


# --- the command line: train --set save_format=peft, then eval-side loading and convert ----------------


def test_train_saves_peft_format_that_peft_and_deltatune_read(tmp_path):
    from transformers import AutoModelForSequenceClassification
    from typer.testing import CliRunner

    from deltatune.cli import app
    from deltatune.train import load_config, load_trained, run_training
    from tests.train.tiny import make_csv, make_tiny_bert

    bert, data = make_tiny_bert(tmp_path / "bert", dropout=0.0), make_csv(tmp_path / "texts.csv", n=24)
    config = load_config(None, [f"model={bert}", "task=classification", f"data.path={data}", f"output={tmp_path / 'run'}",
                                "epochs=1", "batch_size=8", "lr=1e-2", "adapter.target=[query, value]",
                                "save_format=peft"])
    run_training(config, progress=False)
    adapter = tmp_path / "run" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "LORA"
    trained = load_trained(tmp_path / "run")  # eval / predict / merge go through this
    assert trained.labels == ["negative", "neutral", "positive"]
    batch = dict(trained.tokenizer(["good movie", "the worst day"], padding=True, return_tensors="pt"))
    base = AutoModelForSequenceClassification.from_pretrained(bert, num_labels=3)
    theirs = peft.PeftModel.from_pretrained(base, adapter).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(**batch).logits, trained.model(**batch).logits, rtol=0, atol=ATOL)
    result = CliRunner().invoke(app, ["convert", str(adapter), str(tmp_path / "ours"), "--to", "deltatune"])
    assert result.exit_code == 0, result.output
    assert dt.read_adapter_config(tmp_path / "ours")["config"]["method"] == "lora"
    result = CliRunner().invoke(app, ["convert", str(adapter), str(tmp_path / "x"), "--to", "onnx"])
    assert result.exit_code == 2 and "--to must be" in result.output


def test_merge_command_takes_a_directory_written_by_peft(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from typer.testing import CliRunner

    from deltatune.cli import app
    from tests.train.tiny import make_tiny_bert

    bert = make_tiny_bert(tmp_path / "bert", dropout=0.0)
    theirs = peft.get_peft_model(AutoModelForSequenceClassification.from_pretrained(bert, num_labels=3),
                                 peft.LoraConfig(task_type="SEQ_CLS", target_modules=["query", "value"], r=4))
    with torch.no_grad():
        for _, p in sorted(theirs.named_parameters()):
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    theirs.eval().save_pretrained(tmp_path / "peft")  # records base_model_name_or_path: the command finds the base
    batch = dict(AutoTokenizer.from_pretrained(bert)(["good movie", "the worst day"], padding=True, return_tensors="pt"))
    result = CliRunner().invoke(app, ["merge", str(tmp_path / "peft"), "--output", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, theirs(**batch).logits, rtol=0, atol=ATOL)
