"""``deltatune serve`` on each device: a running server on ``device``, queried through the
official ``openai`` client, answers greedily exactly what the library's ``generate`` gives with
that adapter on the same device, token for token, one request at a time and with requests for
different adapters (and the bare base) sharing batches.

A tiny random Llama (2 layers, hidden 32) with LoRA, PEFT-format LoRA, DoRA and (IA)3 adapters,
two attachment slots for four adapters (so adapters are swapped and evicted mid-run), uvicorn in a
thread as in ``tests/serve/test_serve.py``.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

import deltatune as dt  # noqa: E402
from deltatune.serve import Server, load_served  # noqa: E402
from tests.serve.uvicorn_thread import running  # noqa: E402
from tests.train.tiny import make_tiny_llama  # noqa: E402

PROMPTS = [[5, 9, 13, 7, 40, 41], [11, 4], [8, 8, 21, 3, 30, 2, 17, 90, 12]]
NEW = 10


def _adapters(base: Path, root: Path) -> dict[str, Path]:
    """Four adapters with random (far from identity) weights, written from one loaded base."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    specs = {"lora": (dt.LoraConfig(target=["q_proj", "v_proj", "down_proj"], rank=4), "deltatune"),
             "peft-lora": (dt.LoraConfig(target=["q_proj", "o_proj"], rank=2), "peft"),
             "dora": (dt.DoraConfig(target=["q_proj", "v_proj"], rank=4), "deltatune"),
             "ia3": (dt.IA3Config(target=["k_proj", "v_proj", "down_proj"]), "deltatune")}
    g = torch.Generator().manual_seed(11)
    out = {}
    for name, (config, fmt) in specs.items():
        dt.attach(model, config, name=name)
        with torch.no_grad():
            for key, p in model.named_parameters():
                if f".adapters.{name}." in key:
                    noise = 0.5 * torch.randn(p.shape, generator=g)
                    p.copy_(1 + noise if isinstance(config, dt.IA3Config) else noise)
        out[name] = dt.save_adapter(model, root / name, name=name, format=fmt)
        dt.detach(model, name)
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("serve-cuda")
    base = make_tiny_llama(root / "llama")
    return {"base": base, "adapters": _adapters(base, root)}


def _generate(files: dict, device: torch.device, name: str | None) -> dict[int, list[int]]:
    """The library's greedy ``generate`` on ``device`` with adapter ``name`` (None: the bare base),
    for each prompt, exactly ``NEW`` tokens."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(files["base"], dtype=torch.float32).to(device).eval()
    if name is not None:
        dt.load_adapter(model, files["adapters"][name], name)
    out = {}
    with torch.no_grad():
        for i, ids in enumerate(PROMPTS):
            got = model.generate(torch.tensor([ids], device=device), attention_mask=torch.ones(1, len(ids), dtype=torch.long,
                                 device=device), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=1)
            out[i] = got[0, len(ids):].tolist()
    return out


def test_greedy_on_the_device_equals_library_generate_alone_and_mixed(files: dict, device: torch.device) -> None:
    names = [None, *files["adapters"]]
    expected = {(n, i): ids for n in names for i, ids in _generate(files, device, n).items()}
    assert len({tuple(v) for v in expected.values()}) > len(PROMPTS)  # the adapters change the answers

    served = load_served(str(files["base"]), {}, device, torch.float32)
    server = Server(served, files["adapters"], max_loaded=2, max_batch=8, max_queue=64)
    assert server.engine.device.type == device.type  # the model really is on the device under test
    passes: list[list[str | None]] = []  # each forward pass's rows, by adapter
    forward = server.engine._forward
    server.engine._forward = lambda names, *a, **k: passes.append(list(names)) or forward(names, *a, **k)
    with running(server) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)

        def ask(key: tuple[str | None, int]) -> list[int]:
            name, i = key
            r = client.completions.create(model=name or "llama", prompt=PROMPTS[i], max_tokens=NEW, temperature=0,
                                          extra_body={"return_token_ids": True, "ignore_eos": True})
            return r.choices[0].model_extra["token_ids"]

        for key in [(n, 0) for n in names]:  # one at a time
            assert ask(key) == expected[key], key
        keys = list(expected) * 2  # 30 requests over the base and 4 adapters through 2 slots, 8 rows at a time
        with ThreadPoolExecutor(10) as pool:
            got = list(pool.map(ask, keys))
        mismatched = [(k, g, expected[k]) for k, g in zip(keys, got) if g != expected[k]]
        assert not mismatched, mismatched[:3]
        # Streaming with token ids: one event per token, the same tokens.
        streamed = []
        for chunk in client.completions.create(model="lora", prompt=PROMPTS[2], max_tokens=NEW, temperature=0,
                                               stream=True, extra_body={"return_token_ids": True, "ignore_eos": True}):
            streamed += chunk.choices[0].model_extra.get("token_ids") or []
        assert streamed == expected[("lora", 2)]
    assert server.metrics.value("deltatune_adapter_cache_evictions_total") > 0  # 4 adapters through 2 slots
    assert max(len(set(names)) for names in passes) >= 3  # passes shared by the base and two adapters
