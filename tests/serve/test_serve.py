"""``deltatune serve`` against real HTTP clients: the official ``openai`` client and httpx.

One uvicorn server runs in a thread for the module, over a tiny random Llama with a word-level
tokenizer and adapters of several methods and both formats. Greedy output must equal the
library's ``generate`` with that adapter, token for token, alone and in a mixed concurrent batch.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import deltatune as dt  # noqa: E402
from deltatune.serve import Limits, Server, load_served  # noqa: E402
from deltatune.train.chat import encode_pair  # noqa: E402
from tests.serve.uvicorn_thread import free_port, running  # noqa: E402
from tests.train.tiny import make_tiny_bert, make_tiny_llama, save_tiny_classifier  # noqa: E402

PROMPTS = ["hello there how are you", "hi", "how are you a b"]


def _adapter(base: Path, out: Path, config: dt.AdapterConfig, seed: int, format: str = "deltatune") -> Path:
    """An adapter with random (far from identity) weights, so every adapter answers differently."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    dt.attach(model, config, name="x")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapters." in name:
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g) if isinstance(config, dt.IA3Config)
                        else 0.5 * torch.randn(p.shape, generator=g))
    return dt.save_adapter(model, out, name="x", format=format)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("serve")
    base = make_tiny_llama(root / "llama")
    lib = root / "lib"
    adapters = {
        "lora": _adapter(base, root / "lora", dt.LoraConfig(target=["q_proj", "v_proj", "down_proj"], rank=4), 1),
        "peft-lora": _adapter(base, root / "peft-lora", dt.LoraConfig(target=["q_proj", "o_proj"], rank=2), 2, "peft"),
        "dora": _adapter(base, root / "dora", dt.DoraConfig(target=["q_proj", "v_proj"], rank=4), 3),
    }
    (lib / "lazy").parent.mkdir(parents=True)
    _adapter(base, lib / "lazy", dt.LoraConfig(target=["k_proj", "up_proj"], rank=3), 4)
    _adapter(base, lib / "ia3", dt.IA3Config(target=["k_proj", "v_proj", "down_proj"]), 5)
    _adapter(base, root / "extra", dt.LoraConfig(target=["gate_proj"], rank=2), 6)
    served = load_served(str(base), {}, torch.device("cpu"), torch.float32)
    server = Server(served, adapters, lib, max_loaded=3, max_batch=8, max_queue=64, limits=Limits(max_body=20_000))
    with running(server) as url:
        yield {"root": root, "base": base, "lib": lib, "adapters": {**adapters, "lazy": lib / "lazy",
               "ia3": lib / "ia3"}, "server": server, "url": url,
               "client": openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)}


def _library(world: dict, adapter: str | None, ids: list[int], n: int) -> list[int]:
    """What ``generate`` gives in the library, greedy, with ``adapter`` loaded (None: the bare base)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(world["base"])
    model = AutoModelForCausalLM.from_pretrained(world["base"]).eval()
    if adapter is not None:
        dt.load_adapter(model, world["adapters"][adapter], adapter)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
    return out[0, len(ids):].tolist()


def _ids(world: dict, text: str) -> list[int]:
    return world["server"].served.tokenizer(text)["input_ids"]


def test_models_lists_the_base_and_every_adapter_with_its_parent(world: dict) -> None:
    models = {m.id: m for m in world["client"].models.list().data}
    assert set(models) == {"llama", "lora", "peft-lora", "dora", "lazy", "ia3"}
    assert models["llama"].model_extra["parent"] is None
    assert all(models[n].model_extra["parent"] == "llama" for n in models if n != "llama")


def test_greedy_equals_library_generate_alone_and_in_a_mixed_batch(world: dict) -> None:
    client, names = world["client"], [None, "lora", "peft-lora", "dora", "lazy", "ia3"]
    expected = {(n, p): _library(world, n, _ids(world, p), 12) for n in names for p in PROMPTS}
    assert len({tuple(v) for v in expected.values()}) > len(PROMPTS)  # the adapters change the answers

    def ask(key: tuple) -> list[int]:
        name, prompt = key
        r = client.completions.create(model=name or "llama", prompt=prompt, max_tokens=12, temperature=0,
                                      extra_body={"return_token_ids": True})
        ids = r.choices[0].model_extra["token_ids"]
        assert r.usage.completion_tokens == len(ids) and r.usage.prompt_tokens == len(_ids(world, prompt))
        return ids

    for key in [(n, PROMPTS[0]) for n in names]:  # one at a time
        assert ask(key) == expected[key], key
    keys = list(expected) * 2  # 36 concurrent requests over 6 adapters, 8 rows at a time: rows join and leave
    with ThreadPoolExecutor(12) as pool:
        got = list(pool.map(ask, keys))
    assert got == [expected[k] for k in keys]
    metrics = httpx.get(f"{world['url']}/metrics").text
    assert "deltatune_adapter_cache_evictions_total" in metrics  # 5 adapters through 3 slots
    assert world["server"].metrics.value("deltatune_adapter_cache_evictions_total") > 0


def test_chat_streams_what_it_answers_whole_and_matches_the_library(world: dict) -> None:
    client = world["client"]
    messages = [{"role": "user", "content": "hello"}]
    whole = client.chat.completions.create(model="dora", messages=messages, max_tokens=10, temperature=0,
                                           extra_body={"return_token_ids": True})
    tok = world["server"].served.tokenizer
    ids, _ = encode_pair(tok, "hello", None)  # the chat task's own prompt encoding
    expected = _library(world, "dora", ids, 10)
    assert whole.choices[0].model_extra["token_ids"] == expected
    assert whole.choices[0].message.content == tok.decode([t for t in expected if t != tok.eos_token_id],
                                                          skip_special_tokens=True)
    chunks = list(client.chat.completions.create(model="dora", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="lora", prompt=PROMPTS[0], max_tokens=8, temperature=0, stream=True))
    assert streamed == client.completions.create(model="lora", prompt=PROMPTS[0], max_tokens=8, temperature=0).choices[0].text


def test_sampling_parameters(world: dict) -> None:
    client = world["client"]

    def text(**kw: object) -> str:
        return client.completions.create(model="lora", prompt="hi", max_tokens=12, **kw).choices[0].text

    greedy = text(temperature=0)
    assert text(temperature=1.0, top_p=1e-6, seed=3) == greedy  # the nucleus is the top token only
    a, b = text(temperature=1.5, seed=7), text(temperature=1.5, seed=7)
    assert a == b  # a seed makes sampling repeatable
    assert len({text(temperature=2.0, seed=s) for s in range(4)}) > 1
    words = greedy.split()
    r = client.completions.create(model="lora", prompt="hi", max_tokens=12, temperature=0, stop=[words[2]])
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text == greedy[: greedy.index(words[2])]
    r = client.completions.create(model="lora", prompt="hi", max_tokens=3, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3


def test_errors_answer_in_openais_shape(world: dict) -> None:
    client, url = world["client"], world["url"]
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="nope", prompt="hi", max_tokens=2)
    assert err.value.body["code"] == "model_not_found"
    for body in ('{"model": "lora"', '{"model": "lora"}', '{"model": "lora", "prompt": "hi", "temperature": 9}',
                 '[1, 2]', '{"model": "lora", "prompt": "hi", "n": 2}'):
        r = httpx.post(f"{url}/v1/completions", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["message"], body
    r = httpx.post(f"{url}/v1/completions", json={"model": "lora", "prompt": "hi " * 20_000})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.post(f"{url}/v1/completions", json={"model": "lora", "prompt": "hi " * 100, "max_tokens": 100})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="lora", prompt=[], max_tokens=2)
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}


def test_load_and_unload_adapters_at_runtime(world: dict) -> None:
    url, client = world["url"], world["client"]
    r = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "extra", "lora_path": str(world["root"] / "extra")})
    assert r.status_code == 200 and "extra" in r.text
    assert "extra" in {m.id for m in client.models.list().data}
    assert client.completions.create(model="extra", prompt="hi", max_tokens=3, temperature=0).choices[0].text
    again = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "extra", "lora_path": str(world["root"] / "extra")})
    assert again.status_code == 400
    missing = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "x2", "lora_path": str(world["root"] / "none")})
    assert missing.status_code == 400 and "adapter_config.json" in missing.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "extra"})
    assert r.status_code == 200
    assert "extra" not in {m.id for m in client.models.list().data}
    assert "extra" not in dt.configs(world["server"].served.model)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="extra", prompt="hi", max_tokens=2)
    assert httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "extra"}).status_code == 404


def test_prefix_tuning_is_refused_with_the_reason(world: dict) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(world["base"])
    dt.attach(model, dt.PrefixConfig(num_virtual_tokens=3), name="p")
    dt.save_adapter(model, world["root"] / "prefix", name="p")
    r = httpx.post(f"{world['url']}/v1/load_lora_adapter", json={"lora_name": "p", "lora_path": str(world["root"] / "prefix")})
    assert r.status_code == 400 and "prefix" in r.json()["error"]["message"]
    assert "p" not in {m.id for m in world["client"].models.list().data}


def test_a_client_that_goes_away_frees_its_slot(world: dict) -> None:
    server, url = world["server"], world["url"]
    before = server.metrics.value("deltatune_disconnects_total")
    with httpx.stream("POST", f"{url}/v1/completions", json={"model": "lora", "prompt": "hi", "max_tokens": 60,
                                                              "temperature": 0, "stream": True}) as r:
        next(r.iter_lines())  # one event, then hang up
    deadline = time.time() + 10
    while server.metrics.value("deltatune_disconnects_total") == before:
        assert time.time() < deadline, "the engine kept generating for a client that left"
        time.sleep(0.05)
    while server.engine.running:
        assert time.time() < deadline
        time.sleep(0.05)


def test_a_full_queue_answers_429_with_retry_after(world: dict) -> None:
    served = load_served(str(world["base"]), {}, torch.device("cpu"), torch.float32)
    server = Server(served, {"lora": world["adapters"]["lora"]}, max_batch=1, max_queue=1)
    with running(server) as url:
        body = {"model": "lora", "prompt": "hi", "max_tokens": 40, "temperature": 0}
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: httpx.post(f"{url}/v1/completions", json=body, timeout=60), range(8)))
        codes = sorted(r.status_code for r in answers)
        assert 200 in codes and 429 in codes and set(codes) == {200, 429}
        refused = next(r for r in answers if r.status_code == 429)
        assert refused.headers["retry-after"] == "1" and refused.json()["error"]["code"] == "queue_full"
        assert 'deltatune_requests_total{endpoint="/v1/completions",status="429"}' in httpx.get(f"{url}/metrics").text


def test_classification_endpoint(tmp_path: Path) -> None:
    bert = make_tiny_bert(tmp_path / "bert", dropout=0.0)
    labels = ["negative", "neutral", "positive"]
    pos = save_tiny_classifier(bert, tmp_path / "pos", labels, predict="positive")
    neg = save_tiny_classifier(bert, tmp_path / "neg", labels, predict="negative", format="peft")
    named = {"pos": pos, "neg": neg}
    served = load_served(str(bert), named, torch.device("cpu"), torch.float32)
    assert served.kind == "classify"
    with running(Server(served, named)) as url:
        texts = ["good movie", "bad day", "the food"]
        for name, label in (("pos", "positive"), ("neg", "negative")):
            r = httpx.post(f"{url}/v1/classify", json={"model": name, "input": texts}).json()
            assert [d["label"] for d in r["data"]] == [label] * 3
            assert all(abs(sum(d["probabilities"].values()) - 1) < 1e-5 for d in r["data"])
        r = httpx.post(f"{url}/v1/completions", json={"model": "pos", "prompt": "hi"})
        assert r.status_code == 400 and "/v1/classify" in r.json()["error"]["message"]


def test_the_serve_command_starts_a_server(tmp_path: Path) -> None:
    base = make_tiny_llama(tmp_path / "llama")
    lora = _adapter(base, tmp_path / "a", dt.LoraConfig(target=["q_proj"], rank=2), 9)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "deltatune", "serve", str(base), "--adapter", f"a={lora}",
                             "--port", str(port), "--max-loaded", "2"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300  # start-up imports torch and transformers: slow on a loaded machine
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            assert time.time() < deadline
            time.sleep(0.2)
        ids = {m["id"] for m in httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"]}
        assert ids == {"llama", "a"}
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    from typer.testing import CliRunner

    from deltatune.cli import app

    bad = CliRunner().invoke(app, ["serve", str(base), "--adapter", "a"])  # in-process: no second start-up
    assert bad.exit_code == 2 and "NAME=DIR" in bad.output


def test_a_run_trained_on_a_quantized_base_is_served_on_that_base(tmp_path: Path) -> None:
    """Serving a run trained with ``quantize: nf4`` quantizes the served base as training did, so the
    server answers as the trained model; an adapter trained on a full-precision base, served beside
    it, is named in a warning instead of answering differently in silence."""
    from typer.testing import CliRunner

    from deltatune.cli import app
    from deltatune.serve.loading import base_mismatch
    from deltatune.train import load_trained
    from tests.train.tiny import make_csv

    pytest.importorskip("bitsandbytes")
    bert, data = make_tiny_bert(tmp_path / "bert"), make_csv(tmp_path / "texts.csv", n=60)
    common = ["--set", f"model={bert}", "--set", "task=classification", "--set", f"data.path={data}",
              "--set", "epochs=1", "--set", "batch_size=8", "--set", "precision=fp32", "--no-progress"]
    for run, extra in (("nf4", ["--set", "quantize=nf4"]), ("fp", [])):
        result = CliRunner().invoke(app, ["train", *common, *extra, "--output", str(tmp_path / run)])
        assert result.exit_code == 0, result.output
    served = load_served(str(tmp_path / "nf4"), {}, torch.device("cpu"), torch.float32)
    assert served.quantize == "nf4" and served.adapters == {"nf4": tmp_path / "nf4" / "adapter"}
    assert any(type(m).__name__ == "Linear4bit" for m in served.model.modules())
    assert base_mismatch(tmp_path / "nf4" / "adapter", served) is None
    warning = base_mismatch(tmp_path / "fp" / "adapter", served)
    assert warning is not None and "full-precision base" in warning and "nf4 base" in warning
    texts = ["good great day", "awful sad food today"]
    trained = load_trained(tmp_path / "nf4")
    with torch.no_grad():
        expected = torch.softmax(trained.model(**trained.tokenizer(texts, padding=True, return_tensors="pt")).logits, -1)
    with running(Server(served, {})) as url:
        r = httpx.post(f"{url}/v1/classify", json={"model": "nf4", "input": texts}).json()
    got = torch.tensor([[d["probabilities"][label] for label in trained.labels] for d in r["data"]])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)

    # merged models serve on their own (their class names recorded beside them): the full-precision
    # merge answers as the trained model; a re-quantized one is served as transformers loads it (int8
    # here: bitsandbytes' 4-bit CPU inference needs layers at least one block (64) wide, wider than this BERT)
    for how in ("none", "int8"):
        result = CliRunner().invoke(app, ["merge", str(tmp_path / "nf4"), "--output", str(tmp_path / f"m-{how}"),
                                          "--quantize", how])
        assert result.exit_code == 0, result.output
        merged = load_served(str(tmp_path / f"m-{how}"), {}, torch.device("cpu"), torch.float32)
        assert merged.kind == "classify"
        with running(Server(merged, {})) as url:
            r = httpx.post(f"{url}/v1/classify", json={"model": f"m-{how}", "input": texts}).json()
        got = torch.tensor([[d["probabilities"][label] for label in trained.labels] for d in r["data"]])
        if how == "none":
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        else:
            assert any(type(m).__name__ == "Linear8bitLt" for m in merged.model.modules())
            torch.testing.assert_close(got.sum(-1), torch.ones(2))
