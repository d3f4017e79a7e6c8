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
    from deltatune.serve import engine as engine_module

    opened, followed = [], []  # routers opened; swaps an open router followed in place (no re-open)

    class Counted(engine_module.Router):
        def __init__(self, *args, **kwargs):
            opened.append(1)
            super().__init__(*args, **kwargs)

        def swap(self, old, new):
            done = super().swap(old, new)
            followed.append(new) if done else None
            return done

    monkeypatch.setattr(engine_module, "Router", Counted)
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
    assert followed and len(opened) < len(swaps), "an open router should follow swaps in place"
    assert metrics.value("deltatune_adapter_cache_evictions_total") >= len(swaps)


def test_newcomers_wait_a_few_steps_to_share_one_prefill(tmp_path):
    """While rows decode, one newcomer waits (up to ``prefill_wait`` steps) for others to share
    its prefill pass; ``prefill_batch`` ready requests go at once; an idle engine admits at once.
    The tokens are the same as when every newcomer is prefilled alone."""
    from transformers import AutoModelForCausalLM

    from deltatune.train.models import load_tokenizer

    base = make_tiny_llama(tmp_path / "llama")

    def run(prefill_batch: int) -> tuple[list[list[int]], list[int]]:
        model = AutoModelForCausalLM.from_pretrained(base).eval()
        metrics = Metrics()
        engine = Engine(model, load_tokenizer(base), Pool(model, metrics), metrics, max_batch=16,
                        prefill_batch=prefill_batch, prefill_wait=3)
        outs: list[list[int]] = []
        admitted: list[int] = []  # rows running after each step

        def submit(prompt: list[int], n: int) -> None:
            out: list[int] = []
            outs.append(out)
            engine.submit(Job(prompt=prompt, adapter=None, max_tokens=n, temperature=0.0, ignore_eos=True,
                              deliver=lambda e, out=out: out.append(e[2]) if e[0] == "delta" else None))

        def step() -> None:
            with torch.inference_mode():
                engine._step([])
            admitted.append(len(engine.running))

        for i in range(4):
            submit(PROMPTS[i % 3], 12)
        step()                    # idle: all four at once
        submit([3, 4, 5], 6)
        step(), step(), step()    # one newcomer among four running rows waits...
        step()                    # ...until it has waited prefill_wait decode steps
        for i in range(4):
            submit(PROMPTS[i % 3][::-1], 4)
        step()                    # four ready: at once
        while engine.running or engine.waiting:
            step()
        return outs, admitted

    gated, counts = run(4)
    alone, counts_alone = run(1)
    assert gated == alone and all(len(o) for o in gated)
    assert counts[:6] == [4, 4, 4, 4, 5, 9] and counts_alone[:2] == [4, 5]


def test_the_running_batchs_cache_keeps_and_joins_rows_without_an_extra_copy():
    """``kv.build`` hands the tensors themselves to the cache (no copy per join / leave); keeping
    rows drops the columns that are padding in all of them, joining pads the shorter side."""
    from deltatune.serve import kv

    g = torch.Generator().manual_seed(0)
    keys = [torch.randn(3, 2, 5, 4, generator=g) for _ in range(2)]
    values = [torch.randn(3, 2, 5, 4, generator=g) for _ in range(2)]
    cache = kv.build(list(zip(keys, values)))
    assert all(k is keys[i] and v is values[i] for i, (k, v) in enumerate(kv.tensors(cache)))
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 0, 1, 1], [1, 1, 1, 1, 1]])
    kept = kv.Batch(cache, mask).keep([1, 0])  # the first two columns are padding in both rows
    assert kept.mask.tolist() == [[0, 1, 1], [1, 1, 1]]
    for (k, v), k0, v0 in zip(kv.tensors(kept.cache), keys, values):
        assert torch.equal(k, k0[[1, 0], :, 2:]) and torch.equal(v, v0[[1, 0], :, 2:])
    other = kv.Batch(kv.build([(k[2:], v[2:]) for k, v in zip(keys, values)]), mask[2:])
    joined = kept.join(other)
    assert joined.mask.tolist() == [[0, 0, 0, 1, 1], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    for (k, v), k0 in zip(kv.tensors(joined.cache), keys):
        assert torch.equal(k[:2, :, 2:], k0[[1, 0], :, 2:]) and torch.equal(k[:2, :, :2], torch.zeros(2, 2, 2, 4))
        assert torch.equal(k[2:], k0[2:])
    cache = joined.cache
    cache.update(torch.ones(3, 2, 1, 4), torch.ones(3, 2, 1, 4), 0)  # a decode step appends its column
    assert kv.tensors(cache)[0][0].shape == (3, 2, 6, 4)


def test_the_pool_tells_swaps_in_place_from_other_changes(tmp_path):
    """What an open router may follow (``swaps_since``): swaps in place, in order; after any
    other attach or detach, None (the engine re-opens its router)."""
    from transformers import AutoModelForCausalLM

    base = make_tiny_llama(tmp_path / "llama")
    config = dt.LoraConfig(target=["q_proj", "v_proj"], rank=4)
    paths = {f"a{i}": _adapter(base, tmp_path / f"a{i}", config, 30 + i, "deltatune") for i in range(3)}
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    pool = Pool(model, Metrics(), max_loaded=1)
    for name, path in paths.items():
        pool.register(name, path)
    assert pool.ensure("a0")
    start = pool.version
    assert pool.swaps_since(start) == []
    assert pool.ensure("a1") and pool.ensure("a2")
    assert pool.swaps_since(start) == [("a0", "a1"), ("a1", "a2")] and pool.swaps_since(pool.version) == []
    assert pool.swaps_since(start - 1) is None  # before a0 was attached: not a swap
    pool.unload("a2")
    assert pool.swaps_since(start) is None and not pool.loaded


def test_a_packed_prefill_gives_the_padded_ones_tokens(tmp_path, monkeypatch):
    """Prompts of several lengths over LoRA adapters, the bare base and an (IA)³ adapter: packed
    prefills (no padding) give token for token what left-padded ones give, and a group that mixes
    (IA)³ with other adapters (it needs grouping by example) is prefilled padded instead."""
    from transformers import AutoModelForCausalLM

    from deltatune.serve import engine as engine_module
    from deltatune.serve import kv as kv_module
    from deltatune.train.models import load_tokenizer

    base = make_tiny_llama(tmp_path / "llama")
    lora = dt.LoraConfig(target=["q_proj", "v_proj"], rank=4)
    paths = {"l0": _adapter(base, tmp_path / "l0", lora, 40), "l1": _adapter(base, tmp_path / "l1", lora, 41, "peft"),
             "ia3": _adapter(base, tmp_path / "ia3", dt.IA3Config(target=["k_proj", "v_proj", "down_proj"]), 42)}
    groups = [[("l0", [5, 9, 13, 7, 2, 8]), ("l1", [11, 4]), (None, [8, 8, 21]), ("l0", [3])],
              [("ia3", [4, 6, 8, 10, 12]), ("ia3", [7])],                       # one adapter: packed too
              [("ia3", [9, 9, 9, 9]), ("l1", [2, 3]), (None, [6])]]              # mixed with (IA)³: padded
    unpacked: list[int] = []
    real = kv_module.unpack
    monkeypatch.setattr(kv_module, "unpack", lambda cache, lengths: unpacked.append(len(lengths)) or real(cache, lengths))

    def run(pack: bool) -> list[list[int]]:
        model = AutoModelForCausalLM.from_pretrained(base).eval()
        metrics = Metrics()
        pool = Pool(model, metrics, max_loaded=3)
        for name, path in paths.items():
            pool.register(name, path)
            pool.prefetch(name).result()
        engine = Engine(model, load_tokenizer(base), pool, metrics, max_batch=16, pack=pack)
        outs: list[list[int]] = []
        for group in groups:  # each group admitted at once (one prefill), then decoded to the end
            for adapter, prompt in group:
                out: list[int] = []
                outs.append(out)
                engine.submit(Job(prompt=prompt, adapter=adapter, max_tokens=5, temperature=0.0, ignore_eos=True,
                                  deliver=lambda e, out=out: out.append(e[2]) if e[0] == "delta" else None))
            with torch.inference_mode():
                while engine.running or engine.waiting:
                    engine._step([])
        return outs

    unpackable = []
    real_route = engine_module.Router.route

    def route(self, names, lengths=None):
        try:
            return real_route(self, names, lengths)
        except engine_module.Unpackable:
            unpackable.append(list(names))
            raise

    monkeypatch.setattr(engine_module.Router, "route", route)
    packed = run(True)
    assert unpacked == [4, 2] and len(unpackable) == 1 and "ia3" in unpackable[0]
    padded = run(False)
    assert unpacked == [4, 2] and len(unpackable) == 1  # pack=False: never tried
    assert packed == padded and all(len(o) == 5 for o in packed)
