"""The engine alone (no HTTP), many adapters of one shape through few slots: greedy output still
equals the library's ``generate`` token for token while adapters are swapped in place
(``reinstall``) and rows join and leave every step."""

from __future__ import annotations

import threading

import pytest
import torch

import deltatune as dt
from deltatune.serve import adapters as adapters_module
from deltatune.serve.adapters import Pool
from deltatune.serve.engine import Engine, Job
from deltatune.serve.metrics import Metrics
from tests.serve.test_serve import _adapter
from tests.train.tiny import make_tiny_llama

PROMPTS = [[5, 9, 13, 7], [11, 4], [8, 8, 21, 3, 30, 2]]


def _generate(base, path, ids: list[int], n: int) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base).eval()
    if path is not None:
        dt.load_adapter(model, path, "x")
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_six_adapters_through_two_slots_swap_in_place_and_stay_exact(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from deltatune.train.models import load_tokenizer

    base = make_tiny_llama(tmp_path / "llama")
    config = dt.LoraConfig(target=["q_proj", "v_proj"], rank=4)
    paths = {f"a{i}": _adapter(base, tmp_path / f"a{i}", config, 20 + i, "peft" if i % 2 else "deltatune")
             for i in range(6)}
    names = [None, *paths]
    lengths = {name: 3 + i for i, name in enumerate(names)}  # rows finish at different steps
    expected = {(n, i): _generate(base, paths.get(n), p, lengths[n]) for n in names for i, p in enumerate(PROMPTS)}
    assert len({tuple(v) for v in expected.values()}) > len(PROMPTS)

    swaps: list[str] = []
    real = adapters_module.reinstall

    def spy(model, value, name, old):
        done = real(model, value, name, old)
        swaps.append(name) if done else None
        return done

    monkeypatch.setattr(adapters_module, "reinstall", spy)
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    metrics = Metrics()
    pool = Pool(model, metrics, max_loaded=2)
    for name, path in paths.items():
        pool.register(name, path)
    engine = Engine(model, load_tokenizer(base), pool, metrics, max_batch=4)
    engine.start()
    got: dict[tuple, list[int]] = {}
    done = threading.Semaphore(0)
    keys = list(expected) * 2
    try:
        for key in keys:
            out: list[int] = []

            def deliver(event, out=out, key=key):
                if event[0] == "delta":
                    out.append(event[2])
                elif event[0] == "end":
                    got.setdefault(key, []).append(list(out))
                    done.release()
                else:
                    pytest.fail(f"{key}: {event}")

            engine.submit(Job(prompt=PROMPTS[key[1]], adapter=key[0], max_tokens=lengths[key[0]], deliver=deliver,
                              temperature=0.0, ignore_eos=True))
        for _ in keys:
            assert done.acquire(timeout=120)
    finally:
        engine.stop()
    assert all(outs == [expected[k]] * 2 for k, outs in got.items()) and len(got) == len(expected)
    assert swaps, "adapters of one config should be swapped into an evicted one's modules"
    assert metrics.value("deltatune_adapter_cache_evictions_total") >= len(swaps)
