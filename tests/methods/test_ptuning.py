"""P-tuning: the prompt encoder against its formula in float64, parity with Hugging Face PEFT, and
dropping the encoder after training."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

import deltatune as dt
from deltatune.methods.ptuning import PromptEncoder
from tests.methods.prompt_learning_parity import check_generate
from tests.models import ZOO


def _encoder(model, name="default"):
    return model.get_input_embeddings().adapters[name]


def test_mlp_encoder_matches_its_formula_in_float64():
    enc = PromptEncoder(5, 8, 6, "mlp").double()
    z = enc.embedding
    W1, W2, W3 = (enc.mlp[i] for i in (0, 2, 4))
    expected = W3(torch.relu(W2(torch.relu(z @ W1.weight.T + W1.bias))))
    torch.testing.assert_close(enc.virtual_tokens(), expected, rtol=0, atol=1e-12)


def test_lstm_encoder_matches_its_formula_in_float64():
    enc = PromptEncoder(5, 8, 6, "lstm", num_layers=1).double()
    lstm, z = enc.lstm, enc.embedding

    def run(seq, suffix):  # one LSTM direction, gates (i, f, g, o)
        w_ih, w_hh = getattr(lstm, f"weight_ih_l0{suffix}"), getattr(lstm, f"weight_hh_l0{suffix}")
        b = getattr(lstm, f"bias_ih_l0{suffix}") + getattr(lstm, f"bias_hh_l0{suffix}")
        h, c, out = torch.zeros(6, dtype=torch.float64), torch.zeros(6, dtype=torch.float64), []
        for x in seq:
            i, f, g, o = (w_ih @ x + w_hh @ h + b).chunk(4)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            out.append(h)
        return torch.stack(out)

    hidden = torch.cat([run(z, ""), run(z.flip(0), "_reverse").flip(0)], dim=1)  # (N, 2m)
    W4, W5 = enc.mlp[0], enc.mlp[2]
    torch.testing.assert_close(enc.virtual_tokens(), W5(torch.relu(W4(hidden))), rtol=0, atol=1e-12)


def _copy_from_peft(ours, peft_model) -> None:
    theirs, mine = peft_model.prompt_encoder["default"], _encoder(ours)
    with torch.no_grad():
        mine.embedding.copy_(theirs.embedding.weight)
    mine.mlp.load_state_dict(theirs.mlp_head.state_dict())
    if mine.lstm is not None:
        mine.lstm.load_state_dict(theirs.lstm_head.state_dict())


@pytest.mark.parametrize("encoder", ["mlp", "lstm"])
@pytest.mark.parametrize("model_name,task", [("bert", "SEQ_CLS"), ("llama", "CAUSAL_LM")])
def test_peft_parity(model_name, task, encoder):
    from peft import PromptEncoderConfig, get_peft_model

    zoo = ZOO[model_name]
    base = zoo.build()
    ours = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = PromptEncoderConfig(task_type=task, num_virtual_tokens=5, encoder_hidden_size=16,
                                     encoder_reparameterization_type=encoder.upper())
        peft_model = get_peft_model(base, config)
    save = ["classifier"] if task == "SEQ_CLS" else []
    dt.attach(ours, dt.PtuningConfig(num_virtual_tokens=5, encoder=encoder, encoder_hidden_size=16,
                                     modules_to_save=save))
    _copy_from_peft(ours, peft_model)
    inputs = zoo.inputs()
    torch.testing.assert_close(ours(**inputs).logits, peft_model(**inputs).logits, rtol=0, atol=1e-6)  # measured: 0.0
    if task == "CAUSAL_LM":
        ids = inputs["input_ids"]
        check_generate(ours, peft_model, ids, torch.ones_like(ids), steps=5)


@pytest.mark.parametrize("encoder", ["mlp", "lstm"])
def test_dropping_the_encoder_keeps_outputs_and_saves_only_the_tokens(encoder, tmp_path):
    zoo = ZOO["llama"]
    model = zoo.build()
    dt.attach(model, dt.PtuningConfig(num_virtual_tokens=5, encoder=encoder, encoder_hidden_size=8))
    expected = zoo.run(model)
    with torch.no_grad():
        tokens = _encoder(model).virtual_tokens()
    dt.drop_reparameterization(model)
    assert isinstance(dt.configs(model)["default"], dt.PromptConfig)
    # the LSTM's no-grad kernel rounds differently (measured 9e-8)
    torch.testing.assert_close(zoo.run(model), expected, rtol=0, atol=1e-6)
    expected = zoo.run(model)
    assert _encoder(model).prompt.requires_grad
    dt.save_adapter(model, tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert meta["config"]["method"] == "prompt"
    tensors, _, _ = dt.core.stored.adapter_state(model, "default")
    assert list(tensors) == ["model.embed_tokens.prompt"]
    torch.testing.assert_close(tensors["model.embed_tokens.prompt"], tokens, rtol=0, atol=0)
    fresh = zoo.build()
    dt.load_adapter(fresh, tmp_path / "a")
    torch.testing.assert_close(zoo.run(fresh), expected, rtol=0, atol=0)


def test_dropping_needs_a_reparameterisation():
    model = ZOO["bert"].build()
    dt.attach(model, dt.PromptConfig())
    with pytest.raises(ValueError, match="no reparameterisation to drop"):
        dt.drop_reparameterization(model)
    with pytest.raises(ValueError, match="no adapter named 'other'"):
        dt.drop_reparameterization(model, "other")


def test_config_errors_name_the_fix():
    with pytest.raises(ValueError, match="'mlp' or 'lstm'"):
        dt.PtuningConfig(encoder="gru")
    with pytest.raises(ValueError, match="applies to encoder='lstm'"):
        dt.PtuningConfig(encoder_num_layers=3)
    with pytest.raises(ValueError, match="num_virtual_tokens >= 1"):
        dt.PtuningConfig(num_virtual_tokens=0)
    with pytest.raises(ValueError, match="use fewer virtual tokens"):
        dt.attach(ZOO["gpt2"].build(), dt.PtuningConfig(num_virtual_tokens=100))
