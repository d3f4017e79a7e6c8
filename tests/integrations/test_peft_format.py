"""Hugging Face PEFT checkpoints: both directions against the real ``peft`` package, on identical inputs.

"PEFT -> deltatune": PEFT trains (random non-zero adapter weights) and saves; deltatune loads the
directory onto a fresh base and must give PEFT's outputs. "deltatune -> PEFT": the reverse, with
``PeftModel.from_pretrained``. Layer methods first, then the virtual-token methods, then file-only
conversion, pattern translation and the errors. Real models and the command line: test_peft_real.py.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import peft  # test-only dependency (the dev extra): the reference implementation
import pytest
import torch
from safetensors.torch import load_file, save_file

import deltatune as dt
from deltatune import formats as pf
from deltatune.formats.peft_methods import PEFT_METHODS
from deltatune.formats.peft_spec import pattern_from_peft, pattern_to_peft
from tests.models import ZOO

ATOL = 1e-6  # largest gap seen on these tiny models: 9e-8


def _perturb(model: torch.nn.Module, scale: float = 0.1) -> torch.nn.Module:
    """Make every trainable tensor non-zero and distinct, as after training."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))
    return model.eval()


def _peft_saved(zoo_name: str, tmp_path, kind: str = "LoraConfig", **cfg) -> tuple[torch.Tensor, str]:
    zoo = ZOO[zoo_name]
    model = _perturb(peft.get_peft_model(zoo.build(), getattr(peft, kind)(**cfg)))
    model.save_pretrained(tmp_path / "peft")
    return zoo.run(model), str(tmp_path / "peft")


# Each case: a zoo model, a PEFT config class, and a placement covering a layer kind or an option.
CASES = {
    "lora-bert-linear-embedding-saved-patterns": ("bert", "LoraConfig", dict(
        target_modules=["query", "value", "word_embeddings"], modules_to_save=["classifier"], r=4, lora_alpha=8,
        rank_pattern={"layer.1.attention.self.query": 2}, alpha_pattern={"value": 3})),
    "lora-cnn-conv1d-conv2d": ("cnn", "LoraConfig", dict(target_modules=["conv1", "conv2", "conv3", "fc"], r=3,
                                                         lora_alpha=6)),
    "lora-gpt2-conv1d-transposed": ("gpt2", "LoraConfig", dict(target_modules=["c_attn", "c_fc"], r=4, lora_alpha=16,
                                                               fan_in_fan_out=True)),
    "lora-llama-rslora-regex": ("llama", "LoraConfig", dict(target_modules=r".*\.(q_proj|v_proj|down_proj)", r=8,
                                                            lora_alpha=4, use_rslora=True)),
    "dora-bert": ("bert", "LoraConfig", dict(target_modules=["query", "word_embeddings"], r=4, use_dora=True)),
    "dora-cnn": ("cnn", "LoraConfig", dict(target_modules=["conv1", "conv3", "fc"], r=2, use_dora=True)),
    "ia3-bert": ("bert", "IA3Config", dict(target_modules=["key", "value", "output.dense"],
                                           feedforward_modules=["output.dense"])),
    "ia3-cnn-gpt2": ("gpt2", "IA3Config", dict(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"])),
    "ia3-cnn": ("cnn", "IA3Config", dict(target_modules=["conv1", "conv2", "fc"], feedforward_modules=["conv2"])),
    "loha-cnn-cp": ("cnn", "LoHaConfig", dict(target_modules=["conv1", "conv2", "fc"], r=2, alpha=3,
                                              use_effective_conv2d=True)),
    "loha-llama": ("llama", "LoHaConfig", dict(target_modules=["q_proj", "down_proj"], r=4, rank_pattern={"q_proj": 2})),
    "lokr-cnn-cp": ("cnn", "LoKrConfig", dict(target_modules=["conv1", "conv2", "fc"], r=2, use_effective_conv2d=True)),
    "lokr-llama-both": ("llama", "LoKrConfig", dict(target_modules=["q_proj", "down_proj"], r=2, decompose_both=True,
                                                    alpha=5)),
    "vera-llama": ("llama", "VeraConfig", dict(target_modules=["q_proj", "down_proj"], r=16, projection_prng_key=3)),
    "ln-bert": ("bert", "LNTuningConfig", dict(target_modules=["LayerNorm"])),
}


@pytest.mark.parametrize("case", list(CASES))
def test_peft_adapter_loads_with_peft_outputs(case, tmp_path):
    zoo_name, kind, cfg = CASES[case]
    expected, directory = _peft_saved(zoo_name, tmp_path, kind, **cfg)
    model = ZOO[zoo_name].build()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    assert dt.load_adapter(model, directory) == "default"
    assert dt.configs(model)["default"].method == case.split("-")[0]
    torch.testing.assert_close(ZOO[zoo_name].run(model), expected, rtol=0, atol=ATOL)
    dt.detach(model)
    assert all(torch.equal(base[k], v) for k, v in model.state_dict().items())  # base bit-identical


OURS = {
    "bert-linear-embedding-saved-patterns": ("bert", dt.LoraConfig(
        target=["query", "value", "word_embeddings"], modules_to_save=["classifier"], rank=4, alpha=8,
        rank_pattern={"layer.1.attention.self.query": 2}, alpha_pattern={"re:.*value": 3.0})),
    "cnn-convs": ("cnn", dt.LoraConfig(target=["conv1", "conv2", "conv3", "fc"], rank=3, alpha=5)),
    "gpt2-conv1d": ("gpt2", dt.LoraConfig(target="re:.*c_(attn|fc)", rank=4, rslora=True)),
    "llama-all-linear-layers": ("llama", dt.LoraConfig(target="all-linear", layers=[1], rank=4)),
    "llama-exclude": ("llama", dt.LoraConfig(target=["q_proj", "k_proj", "o_proj"], exclude=["layers.0.self_attn.k_proj"])),
    "mlp-pissa": ("mlp", dt.LoraConfig(target=["fc1", "fc2"], rank=4, init="pissa")),
    "llama-olora-rslora": ("llama", dt.LoraConfig(target=["q_proj", "v_proj"], rank=4, init="olora", rslora=True)),
    "bert-dora": ("bert", dt.DoraConfig(target=["query", "word_embeddings"], rank=4)),
    "cnn-dora": ("cnn", dt.DoraConfig(target=["conv1", "conv3", "fc"], rank=2)),
    "bert-ia3-default": ("bert", dt.METHODS["ia3"]()),
    "gpt2-ia3-default": ("gpt2", dt.METHODS["ia3"]()),
    "cnn-ia3": ("cnn", dt.METHODS["ia3"](target=["conv1", "conv2", "fc"], feedforward=["conv2", "fc"])),
    "cnn-loha-cp": ("cnn", dt.METHODS["loha"](target=["conv1", "conv2", "fc"], rank=2, effective_conv=True)),
    "llama-loha-patterns": ("llama", dt.METHODS["loha"](target="all-linear", rank=4, alpha_pattern={"re:.*mlp.*": 2.0})),
    "cnn-lokr-cp": ("cnn", dt.METHODS["lokr"](target=["conv1", "conv2", "fc"], rank=2, effective_conv=True,
                                               init="lycoris")),
    "llama-lokr-both": ("llama", dt.METHODS["lokr"](target=["q_proj", "down_proj"], rank=2, decompose_both=True)),
    "gpt2-vera": ("gpt2", dt.METHODS["vera"](target=["c_attn", "c_fc"], rank=16, projection_seed=5)),
    "llama-ln-default": ("llama", dt.METHODS["ln"]()),
}


@pytest.mark.parametrize("case", list(OURS))
def test_deltatune_adapter_loads_in_peft_with_deltatune_outputs(case, tmp_path):
    zoo_name, config = OURS[case]
    zoo = ZOO[zoo_name]
    model = zoo.build()
    dt.attach(model, config)
    expected = zoo.run(_perturb(model))
    dt.save_adapter(model, tmp_path / "out", format="peft")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        ".deltatune-files.json", "adapter_config.json", "adapter_model.safetensors"]
    theirs = peft.PeftModel.from_pretrained(zoo.build(), tmp_path / "out").eval()
    torch.testing.assert_close(zoo.run(theirs), expected, rtol=0, atol=ATOL)
    # And back: deltatune reads its own PEFT output with the same outputs.
    again = zoo.build()
    dt.load_adapter(again, tmp_path / "out")
    torch.testing.assert_close(zoo.run(again), expected, rtol=0, atol=ATOL)


def test_peft_config_keeps_user_patterns_where_peft_selects_the_same_modules(tmp_path):
    def saved_targets(config):
        model = ZOO["llama"].build()
        dt.attach(model, config)
        dt.save_adapter(model, tmp_path / "a", format="peft")
        return json.loads((tmp_path / "a" / "adapter_config.json").read_text())

    assert saved_targets(dt.LoraConfig(target=["q_proj", "v_proj"]))["target_modules"] == ["q_proj", "v_proj"]
    assert saved_targets(dt.LoraConfig(target="re:.*(q|v)_proj"))["target_modules"] == ".*(q|v)_proj"
    excluded = saved_targets(dt.LoraConfig(target=["q_proj"], exclude=["layers.0.self_attn.q_proj"]))
    assert (excluded["target_modules"], excluded["exclude_modules"]) == (["q_proj"], ["layers.0.self_attn.q_proj"])
    # all-linear and layer indices follow deltatune's own rules: the modules are listed by name.
    layered = saved_targets(dt.LoraConfig(target=["q_proj"], layers=[1]))
    assert layered["target_modules"] == ["model.layers.1.self_attn.q_proj"]
    assert layered["layers_to_transform"] is None


@pytest.mark.parametrize("pattern", ["query", "layer.1.attention.self.query", "re:.*\\.(q|v)_proj", "a-b_c"])
def test_rank_pattern_translation_is_exact_both_ways(pattern):
    names = ["model.layers.0.self_attn.q_proj", "x.layer.1.attention.self.query", "layerX1.attention.self.query",
             "query", "a-b_c", "top.a-b_c", "ya-b_c"]
    from deltatune.core.targeting import name_matches
    from peft.utils.other import get_pattern_key

    key = pattern_to_peft(pattern)
    for n in names:
        assert (get_pattern_key([key], n) == key) == name_matches(n, pattern), (pattern, n)
    assert pattern_from_peft(key) == pattern
    assert pattern_to_peft(pattern_from_peft("layer.1.query")) == "layer.1.query"  # PEFT's own keys round-trip


def test_file_conversion_round_trips_without_a_model(tmp_path):
    expected, directory = _peft_saved("bert", tmp_path, target_modules=["query", "word_embeddings"], r=4,
                                      modules_to_save=["classifier"], use_dora=True, task_type="SEQ_CLS")
    pf.convert(directory, tmp_path / "ours", to="deltatune")
    meta = dt.read_adapter_config(tmp_path / "ours")
    assert meta["format"] == "deltatune" and meta["config"]["method"] == "dora"
    model = ZOO["bert"].build()
    dt.load_adapter(model, tmp_path / "ours")  # the deltatune loader, not the PEFT one
    torch.testing.assert_close(ZOO["bert"].run(model), expected, rtol=0, atol=ATOL)
    pf.convert(tmp_path / "ours", tmp_path / "back", to="peft")
    before, after = load_file(f"{directory}/adapter_model.safetensors"), load_file(tmp_path / "back" / "adapter_model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    old, new = (json.loads(p.read_text()) for p in (tmp_path / "peft" / "adapter_config.json",
                                                    tmp_path / "back" / "adapter_config.json"))
    for field in ("peft_type", "task_type", "r", "lora_alpha", "use_dora", "target_modules", "modules_to_save"):
        assert new[field] == (["classifier"] if field == "modules_to_save" else old[field]), field
    with pytest.raises(ValueError, match="already a peft adapter"):
        pf.convert(tmp_path / "back", tmp_path / "x", to="peft")


def test_save_from_deltatune_format_directory_keeps_layer_kinds(tmp_path):
    model = ZOO["bert"].build()
    dt.attach(model, dt.DoraConfig(target=["query", "word_embeddings"], rank=2))
    expected = ZOO["bert"].run(_perturb(model))
    dt.save_adapter(model, tmp_path / "ours")
    pf.convert(tmp_path / "ours", tmp_path / "peft", to="peft")
    keys = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert "base_model.model.bert.embeddings.word_embeddings.lora_embedding_A" in keys
    theirs = peft.PeftModel.from_pretrained(ZOO["bert"].build(), tmp_path / "peft").eval()
    torch.testing.assert_close(ZOO["bert"].run(theirs), expected, rtol=0, atol=ATOL)


# --- virtual-token methods: PEFT's prompt_embeddings names no module, so these load onto a model ------

PROMPT_CASES = {
    "prompt-llama": ("llama", "PromptTuningConfig", dict(task_type="CAUSAL_LM", num_virtual_tokens=4)),
    "prompt-bert-classifier": ("bert", "PromptTuningConfig", dict(task_type="SEQ_CLS", num_virtual_tokens=3)),
    "ptuning-llama-lstm": ("llama", "PromptEncoderConfig", dict(task_type="CAUSAL_LM", num_virtual_tokens=4,
                                                                encoder_hidden_size=16,
                                                                encoder_reparameterization_type="LSTM")),
    "prefix-llama": ("llama", "PrefixTuningConfig", dict(task_type="CAUSAL_LM", num_virtual_tokens=3)),
    "prefix-llama-projection": ("llama", "PrefixTuningConfig", dict(task_type="CAUSAL_LM", num_virtual_tokens=3,
                                                                    prefix_projection=True, encoder_hidden_size=8)),
}


@pytest.mark.parametrize("case", list(PROMPT_CASES))
def test_peft_virtual_token_adapter_loads_with_peft_outputs(case, tmp_path):
    zoo_name, kind, cfg = PROMPT_CASES[case]
    expected, directory = _peft_saved(zoo_name, tmp_path, kind, **cfg)
    model = ZOO[zoo_name].build()
    dt.load_adapter(model, directory)
    # P-tuning's file holds its encoder's output: it reads as prompt tuning, as PEFT itself uses it.
    assert dt.configs(model)["default"].method == {"ptuning": "prompt"}.get(case.split("-")[0], case.split("-")[0])
    torch.testing.assert_close(ZOO[zoo_name].run(model), expected, rtol=0, atol=ATOL)
    with pytest.raises(ValueError, match="names no module of its base model"):
        pf.convert(directory, tmp_path / "x", to="deltatune")


PROMPT_OURS = {
    "llama-prompt": ("llama", dt.METHODS["prompt"](num_virtual_tokens=4)),
    "bert-prompt-classifier": ("bert", dt.METHODS["prompt"](num_virtual_tokens=3, modules_to_save=["classifier"])),
    "llama-ptuning": ("llama", dt.METHODS["ptuning"](num_virtual_tokens=4, encoder_hidden_size=8)),
    "llama-prefix": ("llama", dt.METHODS["prefix"](num_virtual_tokens=3)),
    "llama-prefix-projection": ("llama", dt.METHODS["prefix"](num_virtual_tokens=3, projection_dim=8)),
}


@pytest.mark.parametrize("case", list(PROMPT_OURS))
def test_deltatune_virtual_token_adapter_loads_in_peft(case, tmp_path):
    zoo_name, config = PROMPT_OURS[case]
    zoo = ZOO[zoo_name]
    model = zoo.build()
    dt.attach(model, config)
    expected = zoo.run(_perturb(model))
    dt.save_adapter(model, tmp_path / "out", format="peft")
    theirs = peft.PeftModel.from_pretrained(zoo.build(), tmp_path / "out").eval()
    torch.testing.assert_close(zoo.run(theirs), expected, rtol=0, atol=ATOL)


def test_virtual_token_adapter_without_a_task_type_is_refused(tmp_path):
    model = ZOO["bert"].build()  # a classifier whose head the adapter does not save: PEFT would need it
    dt.attach(model, dt.METHODS["prompt"](num_virtual_tokens=2))
    with pytest.raises(ValueError, match="only with a task_type"):
        dt.save_adapter(model, tmp_path / "out", format="peft")
    assert not (tmp_path / "out").exists()


# --- errors ----------------------------------------------------------------------------------------


def _edit_config(directory, **changes):
    path = Path(directory) / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_unknown_fields_of_a_newer_peft_warn_once_and_are_ignored(tmp_path):
    expected, directory = _peft_saved("mlp", tmp_path, target_modules=["fc1"], r=2)
    _edit_config(directory, shiny_new_option=3, another_new_flag=True, unset_new_field=None)
    model = ZOO["mlp"].build()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dt.load_adapter(model, directory)
    mine = [w for w in caught if "does not know" in str(w.message)]
    assert len(mine) == 1 and "another_new_flag, shiny_new_option" in str(mine[0].message)
    torch.testing.assert_close(ZOO["mlp"].run(model), expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("changes, message", [
    (dict(peft_type="BOFT"), "PEFT method 'BOFT' is not supported"),
    (dict(bias="all"), "bias='all'"),
    (dict(layer_replication=[[0, 1]]), "layer_replication"),
    (dict(r=3), "'base_model.model.fc1.lora_A.weight' has shape \\(2, 16\\) but .* implies \\(3, 16\\)"),
])
def test_unsupported_or_inconsistent_config_is_an_error_naming_it(tmp_path, changes, message):
    _, directory = _peft_saved("mlp", tmp_path, target_modules=["fc1"], r=2)
    _edit_config(directory, **changes)
    model = ZOO["mlp"].build()
    keys = list(model.state_dict())
    with pytest.raises(ValueError, match=message):
        dt.load_adapter(model, directory)
    assert list(model.state_dict()) == keys  # nothing left attached


def test_tensor_file_that_does_not_match_is_an_error_naming_the_key(tmp_path):
    _, directory = _peft_saved("mlp", tmp_path, target_modules=["fc1", "fc2"], r=2)
    path = f"{directory}/adapter_model.safetensors"
    tensors = load_file(path)
    del tensors["base_model.model.fc2.lora_B.weight"]
    save_file(tensors, path)
    with pytest.raises(ValueError, match="'base_model.model.fc2.lora_B.weight' is missing"):
        dt.load_adapter(ZOO["mlp"].build(), directory)
    tensors["base_model.model.fc2.lora_B.weight"] = torch.zeros(32, 2)
    tensors["base_model.model.fc9.lora_A.weight"] = torch.zeros(2, 16)
    save_file(tensors, path)
    with pytest.raises(ValueError, match="'base_model.model.fc9.lora_A.weight' is for module 'fc9'"):
        dt.load_adapter(ZOO["mlp"].build(), directory)
    del tensors["base_model.model.fc9.lora_A.weight"]
    tensors["base_model.model.fc2.lora_magnitude_vector"] = torch.zeros(32)
    save_file(tensors, path)
    with pytest.raises(ValueError, match="'base_model.model.fc2.lora_magnitude_vector' is not a LORA tensor"):
        dt.load_adapter(ZOO["mlp"].build(), directory)


def test_pickled_weights_are_refused_with_the_fix(tmp_path):
    _, directory = _peft_saved("mlp", tmp_path, target_modules=["fc1"], r=2)
    (tmp_path / "peft" / "adapter_model.safetensors").rename(tmp_path / "peft" / "adapter_model.bin")
    with pytest.raises(ValueError, match="never loads.*safetensors"):
        dt.load_adapter(ZOO["mlp"].build(), directory)


def test_what_has_no_peft_form_is_refused_before_writing(tmp_path):
    model = ZOO["mlp"].build()
    dt.attach(model, dt.LoraConfig(target=["fc1"]), "a")
    with pytest.raises(ValueError, match="extra metadata"):
        dt.save_adapter(model, tmp_path / "x", "a", extra={"run": 1}, format="peft")
    with pytest.raises(ValueError, match="format must be"):
        dt.save_adapter(model, tmp_path / "x", "a", format="onnx")
    dt.attach(model, dt.METHODS["bitfit"](), "b")
    with pytest.raises(ValueError, match="'bitfit' has no PEFT equivalent"):
        dt.save_adapter(model, tmp_path / "x", "b", format="peft")
    from deltatune.config import HybridConfig

    dt.attach(model, HybridConfig(parts=(dt.LoraConfig(target=["fc2"]), dt.METHODS["bitfit"]())), "h")
    with pytest.raises(ValueError, match="hybrid adapter has no PEFT equivalent"):
        dt.save_adapter(model, tmp_path / "x", "h", format="peft")
    assert not (tmp_path / "x").exists()


def test_every_config_field_of_a_converted_method_has_a_peft_field():
    import dataclasses

    from deltatune.methods import METHODS

    for method, entry in PEFT_METHODS.items():
        if method not in METHODS:
            continue
        fields = {f.name for f in dataclasses.fields(METHODS[method])} - {"target", "exclude", "layers", "modules_to_save"}
        assert fields == set(entry.fields) | entry.init_only, method
