"""Pins the transformers KV-cache behaviour that prefix tuning relies on (``integrations/transformers_cache.py``).

If a transformers release changes how caches are built, filled, offset or masked, these tests fail
loudly. The central check needs no reference implementation: a prefix equal to the keys and
values the model itself computes for real tokens x must make ``model(y)`` behave exactly like the
base model on ``[x ; y]`` (causal models: x never attends to y), for logits and for ``generate``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.integrations.transformers_cache import cache_keyword, output_cache
from tests.models import ZOO

CALLER_KEYWORDS = ["cache", "past_key_values"]  # users and PEFT pass either; the hooks hand on the model's own

X = torch.tensor([[11, 12, 13, 14, 15]])  # the real tokens whose activations become the prefix
N = X.shape[1]


def _activations_as_prefix(base: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The keys/values ``base`` caches for ``x``, in the adapter's flat layout ``(N, L·2·H·D)``."""
    from transformers import DynamicCache

    cache = DynamicCache(config=base.config)
    with torch.no_grad():
        base(input_ids=x, use_cache=True, **{cache_keyword(base): cache})
    kv = torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers])  # (L, 2, H, N, D)
    return kv.permute(3, 0, 1, 2, 4).reshape(x.shape[1], -1)


def _with_prefix(model: nn.Module, prefix: torch.Tensor) -> nn.Module:
    dt.attach(model, dt.PrefixConfig(num_virtual_tokens=prefix.shape[0]))
    with torch.no_grad():
        model.get_input_embeddings().adapters["default"].prefix.copy_(prefix)
    return model


def test_the_cache_api_we_rely_on():
    from transformers import Cache, DynamicCache
    from transformers.cache_utils import DynamicLayer

    for name in ("bert", "llama", "gpt2"):
        cache = DynamicCache(config=ZOO[name].build().config)
        assert isinstance(cache, Cache) and all(type(layer) is DynamicLayer for layer in cache.layers)
        k = torch.randn(2, 3, 4, 5)
        keys, values = cache.update(k, -k, 0)
        keys, values = cache.update(k[:, :, :1], -k[:, :, :1], 0)  # appends along the sequence axis
        assert keys.shape == (2, 3, 5, 5) and torch.equal(values[:, :, :4], -k)
        assert cache.get_seq_length() == 5 and cache.get_seq_length(0) == 5
        cache.__dict__["_deltatune_virtual"] = {"a": ("prefix", 4)}  # the tag must survive as a plain attribute
        assert cache._deltatune_virtual == {"a": ("prefix", 4)}


@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
def test_prefix_of_real_activations_equals_the_longer_sequence(model_name):
    zoo = ZOO[model_name]
    base = zoo.build()
    model = _with_prefix(zoo.build(), _activations_as_prefix(base, X))
    g = torch.Generator().manual_seed(2)
    y = torch.randint(5, 100, (2, 6), generator=g)
    full = torch.cat([X.expand(2, -1), y], dim=1)
    with torch.no_grad():
        expected = base(input_ids=full).logits[:, N:]
        torch.testing.assert_close(model(input_ids=y).logits, expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(model(input_ids=y, attention_mask=torch.ones_like(y)).logits, expected,
                                   rtol=0, atol=1e-5)
        kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
        expected_tokens = base.generate(input_ids=full, attention_mask=torch.ones_like(full), **kw)[:, N:]
        assert torch.equal(model.generate(input_ids=y, attention_mask=torch.ones_like(y), **kw), expected_tokens)


def test_prefix_of_real_activations_in_a_one_layer_encoder():
    from transformers import BertConfig, BertModel

    def build() -> nn.Module:
        torch.manual_seed(0)
        return BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=37, max_position_embeddings=64)).eval()

    # one layer: x's keys/values do not depend on y, so the encoder sees exactly [x ; y]
    base = build()
    model = _with_prefix(build(), _activations_as_prefix(base, X))
    y = torch.randint(5, 100, (2, 6))
    mask = torch.ones_like(y)
    mask[1, 4:] = 0
    full_mask = torch.cat([torch.ones(2, N, dtype=torch.long), mask], dim=1)
    with torch.no_grad():
        expected = base(input_ids=torch.cat([X.expand(2, -1), y], dim=1), attention_mask=full_mask).last_hidden_state
        got = model(input_ids=y, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got, expected[:, N:], rtol=0, atol=1e-5)


def test_checkpointing_enabled_after_attach_fails_loudly():
    model = _with_prefix(ZOO["llama"].build(), torch.randn(N, 64))
    model.activation_checkpointing_enable()  # transformers drops the KV cache while training
    model.train()
    with pytest.raises(ValueError, match="activation_checkpointing_disable"):
        model(input_ids=torch.ones(1, 3, dtype=torch.long))
    model.eval()  # inference keeps the cache
    model(input_ids=torch.ones(1, 3, dtype=torch.long))


def test_a_model_dropping_the_prefix_fails_loudly():
    from transformers import LlamaForCausalLM

    class Forgetful(LlamaForCausalLM):
        def forward(self, *args, past_key_values=None, cache=None, **kwargs):  # drops the cache it is given
            return super().forward(*args, **kwargs)

    torch.manual_seed(0)
    model = Forgetful(ZOO["llama"].build().config)
    model.forward = LlamaForCausalLM.forward.__get__(model)  # attach normally (the probe must pass)
    dt.attach(model, dt.PrefixConfig(num_virtual_tokens=N))
    del model.forward
    with pytest.raises(RuntimeError, match="did not attend to the prefix of adapter 'default'"):
        model(input_ids=torch.ones(1, 3, dtype=torch.long), attention_mask=None)


class _NoCache(nn.Module):
    """A transformers-looking model whose forward swallows the KV cache."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import LlamaConfig

        self.config = LlamaConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2)
        self.embed = nn.Embedding(10, 8)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def forward(self, input_ids=None, **kwargs):
        return self.embed(input_ids)


def test_models_without_a_usable_cache_are_refused_on_attach():
    with pytest.raises(ValueError, match=r"does not keep keys and values in the KV cache \(past_key_values=\)"):
        dt.attach(_NoCache(), dt.PrefixConfig(num_virtual_tokens=2))


@pytest.mark.parametrize("keyword", CALLER_KEYWORDS)
def test_foreign_caches_are_refused(keyword):
    from transformers import StaticCache

    model = _with_prefix(ZOO["llama"].build(), torch.randn(N, 64))
    ids = torch.ones(1, 3, dtype=torch.long)
    with torch.no_grad(), dt.disabled(model):
        cache = output_cache(model(input_ids=ids, use_cache=True))
    with pytest.raises(ValueError, match="holds 3 tokens computed without adapter 'default'"):
        model(input_ids=ids, **{keyword: cache})
    static = StaticCache(config=model.config, max_cache_len=16)
    with pytest.raises(ValueError, match="fills a DynamicCache"):
        model(input_ids=ids, **{keyword: static})
    with pytest.raises(ValueError, match="pass the KV cache once"):
        model(input_ids=ids, cache=cache, past_key_values=cache)


@pytest.mark.parametrize("keyword", CALLER_KEYWORDS)
def test_decoding_steps_reuse_the_prefix_from_the_cache(keyword):
    zoo = ZOO["llama"]
    model = _with_prefix(zoo.build(), torch.randn(N, 64))
    ids = torch.randint(5, 100, (1, 7))
    with torch.no_grad():
        whole = model(input_ids=ids).logits
        first = model(input_ids=ids[:, :4], use_cache=True)
        cache = output_cache(first)
        assert cache.get_seq_length() == N + 4
        step = model(input_ids=ids[:, 4:], attention_mask=torch.ones(1, 7, dtype=torch.long), **{keyword: cache})
    assert cache.get_seq_length() == N + 7  # the prefix was not added twice
    torch.testing.assert_close(step.logits, whole[:, 4:], rtol=0, atol=1e-5)


def test_the_cache_keyword_is_read_from_the_forward_signature():
    """Both APIs, whichever transformers is installed: ``cache=`` (>= 5.24) and ``past_key_values=`` (<= 5.23)."""
    import functools

    class New(nn.Module):
        def forward(self, input_ids=None, cache=None, **kwargs): ...

    class Old(nn.Module):
        def forward(self, input_ids=None, past_key_values=None, **kwargs): ...

    class Wrapped(nn.Module):  # a decorator (like transformers' deprecate_kwarg) keeps the real signature
        @staticmethod
        def _deprecate(f):
            @functools.wraps(f)
            def inner(*args, **kwargs):
                return f(*args, **kwargs)
            return inner

        forward = _deprecate(New.forward)

    class KwargsOnly(nn.Module):  # remote-code style: the old name is what such models read
        def forward(self, **kwargs): ...

    assert cache_keyword(New()) == "cache" and cache_keyword(Wrapped()) == "cache"
    assert cache_keyword(Old()) == "past_key_values" and cache_keyword(KwargsOnly()) == "past_key_values"
    import transformers

    llama = ZOO["llama"].build()
    assert cache_keyword(llama) in CALLER_KEYWORDS
    print(f"transformers {transformers.__version__}: models take {cache_keyword(llama)}=")
