"""Dropout with masks drawn as random bits (core/fast_dropout.py, train/dropout.py).

The specification: each element is kept independently with probability 1 - p (statistics, both
halves of every random word); kept elements are scaled by exactly 1 / (1 - p) in the op's float
arithmetic; the gradient is mask x grad x 1 / (1 - p); eval mode and p = 0 are the identity; the
masks come from torch's generator (a seed reproduces them); inside the mode, nn.Dropout and
attention dropout take this path and give the float64 formula's result within bf16 tolerance under
bf16 autocast; training through the runner leaves the base bit-identical; ``dropout_kernel: torch``
keeps torch's own dropout.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deltatune as dt
from deltatune.core.fast_dropout import FastDropout, attention, dropout, keep_mask, keep_threshold, mask_bits
from deltatune.train.dropout import applies, fast_dropout_runner
from deltatune.train.loop import make_runner

BF16 = torch.bfloat16


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 0.01, 0.99])
def test_keep_rate_statistics(p):
    torch.manual_seed(0)
    n = 1_000_003  # not a multiple of the integers per word: the last word is cut
    keep = keep_mask((n,), p)
    assert keep.dtype == torch.bool and keep.shape == (n,)
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(keep.double().mean().item() - (1 - p)) < 5 * sigma
    per_word = 4 if mask_bits(p) == 15 else 2
    for i in range(per_word):  # each 15-bit quarter (31-bit half) of every random word
        part = keep[i::per_word]
        sigma_h = math.sqrt(p * (1 - p) / part.numel())
        assert abs(part.double().mean().item() - (1 - p)) < 5 * sigma_h
    # neighbours independent: P(both kept) = (1 - p)^2
    both = (keep[:-1] & keep[1:]).double().mean().item()
    assert abs(both - (1 - p) ** 2) < 5 * math.sqrt((1 - p) ** 2 / n)


def test_threshold_within_2_to_minus_16_or_32():
    assert [mask_bits(p) for p in (0.1, 0.5, 2**-5, 1 - 2**-5, 0.01, 0.99, 1e-6)] == [15, 15, 15, 15, 31, 31, 31]
    for p in (0.1, 0.2, 0.3, 0.5, 0.7, 0.05, 1e-6, 0.01):
        bits = mask_bits(p)
        assert abs(keep_threshold(p, bits) / 2**bits - (1 - p)) <= 2 ** -(bits + 1)
        if bits == 15:  # p and 1 - p both at least 1/32: relative error at most 2**-11
            assert abs(keep_threshold(p, bits) / 2**bits - (1 - p)) <= 2**-11 * min(p, 1 - p)
    # a small rate is not rounded away
    torch.manual_seed(0)
    assert not keep_mask((2_000_000,), 1e-5).all()


@pytest.mark.parametrize("dtype", [torch.float32, BF16, torch.float64])
def test_exact_scaling_and_seeded_mask(dtype):
    p = 0.1
    x = torch.randn(64, 33).to(dtype)
    torch.manual_seed(3)
    out = dropout(x, p)
    torch.manual_seed(3)
    keep = keep_mask(x.shape, p)
    scale = 1.0 / (1.0 - p)
    # the op's float arithmetic: x times 1/(1-p) as the op's compute type, rounded once to x's dtype
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    expected = torch.where(keep, (x.to(compute) * torch.tensor(scale, dtype=compute)).to(dtype), torch.zeros((), dtype=dtype))
    assert torch.equal(out, expected)
    assert out.dtype == dtype


def test_gradient_is_mask_times_grad():
    p = 0.3
    x = torch.randn(17, 40, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(5)
    out = dropout(x, p)
    g = torch.randn_like(out)
    out.backward(g)
    torch.manual_seed(5)
    keep = keep_mask(x.shape, p)
    assert torch.equal(x.grad, torch.where(keep, g * (1.0 / (1.0 - p)), torch.zeros((), dtype=g.dtype)))
    assert torch.autograd.gradcheck(lambda t: (torch.manual_seed(1), dropout(t, p))[1], (x.detach().clone().requires_grad_(),))


def test_eval_and_zero_p_are_identity():
    x = torch.randn(5, 7)
    assert dropout(x, 0.5, training=False) is x and dropout(x, 0.0) is x
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))
    with pytest.raises(ValueError, match="between 0 and 1"):
        dropout(x, 1.5)
    drop = nn.Dropout(0.4).eval()
    with FastDropout():
        assert torch.equal(drop(x), x)
        q, k, v = torch.randn(3, 2, 2, 6, 8).unbind(0)
        assert torch.equal(F.scaled_dot_product_attention(q, k, v), F.scaled_dot_product_attention(q, k, v, dropout_p=0.0))


def test_mode_takes_nn_dropout_and_attention_dropout():
    x = torch.randn(4, 9, 16)
    drop = nn.Dropout(0.2).train()
    with FastDropout():
        torch.manual_seed(7)
        got = drop(x)
    torch.manual_seed(7)
    assert torch.equal(got, dropout(x, 0.2))
    q, k, v = torch.randn(3, 2, 4, 9, 8).unbind(0)
    mask = torch.rand(2, 1, 9, 9) > 0.3
    mask[..., 0] = True
    with FastDropout():
        torch.manual_seed(8)
        got = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.25)
    torch.manual_seed(8)
    assert torch.equal(got, attention(q, k, v, mask, 0.25))


def _attention64(q, k, v, mask, keep, p):
    """The float64 formula: softmax(q k^T / sqrt(d) + mask) with the dropout mask, times v."""
    q, k, v = q.double(), k.double(), v.double()
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.double()
    return (torch.softmax(s, -1) * keep / (1 - p)) @ v


@pytest.mark.parametrize("masked", ["bool", "float", "causal", "none"])
def test_attention_matches_float64_formula(masked):
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 3, 10, 16).unbind(0)
    mask = torch.rand(2, 1, 10, 10) > 0.4
    mask[..., 0] = True
    causal = torch.ones(10, 10, dtype=torch.bool).tril()
    m = {"bool": mask, "float": torch.zeros(mask.shape).masked_fill(~mask, -1e9), "causal": None,
         "none": None}[masked]
    ref_mask = causal if masked == "causal" else (torch.ones(10, 10, dtype=torch.bool) if m is None else m)
    # without dropout: torch's own kernel, float32
    plain = attention(q, k, v, m, 0.0, is_causal=masked == "causal")
    assert torch.allclose(plain, F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=masked == "causal"),
                          atol=1e-5)
    # with dropout, float32 and bf16 autocast against the float64 formula on the same mask
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.manual_seed(4)
    with torch.autocast("cpu", dtype=BF16), FastDropout():
        out = F.scaled_dot_product_attention(*leaves, attn_mask=m, dropout_p=0.2, is_causal=masked == "causal")
    g = torch.randn(out.shape)
    out.float().backward(g)
    torch.manual_seed(4)
    keep = keep_mask((2, 3, 10, 10), 0.2)
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref = _attention64(*ref_leaves, ref_mask, keep, 0.2)
    ref.backward(g.double())
    assert out.dtype == BF16
    for got, want in [(out, ref), *((a.grad, b.grad) for a, b in zip(leaves, ref_leaves))]:
        tol = 0.03 * want.abs().max().item()  # bf16 tolerance: 3 % of the largest value
        assert (got.double() - want.detach()).abs().max().item() <= tol


def test_dropout_under_autocast_matches_float64():
    x = torch.randn(32, 20, 24, requires_grad=True)
    lin = nn.Linear(24, 24)
    torch.manual_seed(2)
    with torch.autocast("cpu", dtype=BF16), FastDropout():
        y = F.dropout(lin(x), 0.1, True)
    y.float().sum().backward()
    torch.manual_seed(2)
    keep = keep_mask(y.shape, 0.1)
    x64 = x.detach().double().requires_grad_()
    ref = (x64 @ lin.weight.double().T + lin.bias.double()) * keep / 0.9
    ref.sum().backward()
    assert y.dtype == BF16
    assert (y.double() - ref).abs().max() <= 0.03 * ref.abs().max()
    assert (x.grad.double() - x64.grad).abs().max() <= 0.03 * x64.grad.abs().max()


def _tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                        max_position_embeddings=32, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
                        num_labels=3)
    return BertForSequenceClassification(config)


def test_training_through_the_runner_keeps_base_bit_identical():
    model = _tiny_bert()
    assert model.config._attn_implementation == "sdpa"
    dt.attach(model, dt.LoraConfig(rank=4, target="all-linear", exclude=("classifier",)))
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trained]
    opt = torch.optim.AdamW(trained, lr=1e-2)
    run = fast_dropout_runner(make_runner(torch.device("cpu"), "bf16"))
    ids = torch.randint(1, 50, (8, 12))
    mask = torch.ones_like(ids)
    mask[:4, 9:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 3, (8,))}
    calls = []
    orig = FastDropout.__torch_function__

    def spy(self, func, types, args=(), kwargs=None):
        if func in (F.dropout, F.scaled_dot_product_attention):
            calls.append(func.__name__)
        return orig(self, func, types, args, kwargs)

    FastDropout.__torch_function__ = spy
    try:
        model.train()
        for _ in range(3):
            run(model, batch).loss.backward()
            opt.step()
            opt.zero_grad()
        assert "dropout" in calls and "scaled_dot_product_attention" in calls
        n = len(calls)
        model.eval()  # eval forwards do not enter the mode
        with torch.no_grad():
            run(model, {k: v for k, v in batch.items() if k != "labels"})
        assert len(calls) == n
    finally:
        FastDropout.__torch_function__ = orig
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)
    assert any(not torch.equal(p, b) for p, b in zip(trained, before))
    # eval mode: the same output with and without the wrapper, bit for bit
    x = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        assert torch.equal(run(model, x).logits, make_runner(torch.device("cpu"), "bf16")(model, x).logits)


def test_config_key_and_where_it_applies():
    from deltatune.train.schema import TrainConfig

    assert TrainConfig().dropout_kernel == "fast"
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert applies(TrainConfig(), cpu)
    assert not applies(TrainConfig(dropout_kernel="torch"), cpu)  # torch's own dropout, as before
    assert not applies(TrainConfig(gradient_checkpointing=True), cpu)
    assert not applies(TrainConfig(), cuda)
    with pytest.raises(ValueError):
        TrainConfig(dropout_kernel="bits")


def test_a_fully_masked_row_gives_zeros_as_torch():
    q, k, v = torch.randn(3, 1, 2, 4, 8).unbind(0)
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    mask[..., 2, :] = False  # query 2 may see no key
    plain = attention(q, k, v, mask, 0.0)
    assert torch.equal(plain[..., 2, :], torch.zeros_like(plain[..., 2, :]))
    assert torch.allclose(plain, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), atol=1e-6)


def test_a_model_without_dropout_runs_without_the_mode():
    from deltatune.train.dropout import has_dropout

    seen = []
    run = fast_dropout_runner(lambda model, batch: seen.append(torch._C._is_torch_function_mode_enabled()))
    plain = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.0)).train()
    run(plain, {})
    run(nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.1)).train(), {})
    run(nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.1)).eval(), {})
    assert seen == [False, True, False]
    assert not has_dropout(plain) and has_dropout(_tiny_bert())
    from transformers import LlamaConfig

    class WithConfig(nn.Module):
        config = LlamaConfig(attention_dropout=0.1)

    assert has_dropout(WithConfig())


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_boolean_attention_mask_as_torch_math_path_bit_for_bit(dtype):
    """A boolean attn_mask is applied as an added 0 / -inf bias (one vectorised add): the same scores,
    bit for bit, as torch's math path's masked_fill, for broadcast (B, 1, 1, S) and full masks."""
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 3, 7, 8).to(dtype).unbind(0)
    for mask in (torch.rand(2, 1, 1, 7) > 0.3, torch.rand(2, 3, 7, 7) > 0.3):
        mask[..., 0] = True
        torch.manual_seed(9)
        got = attention(q, k, v, mask, 0.1)
        torch.manual_seed(9)
        keep = keep_mask((2, 3, 7, 7), 0.1)
        root = math.sqrt(1.0 / math.sqrt(8))
        scores = ((q * root) @ (k.transpose(-2, -1) * root)).masked_fill_(~mask, float("-inf"))
        probs = torch.softmax(scores, -1)
        want = torch.where(keep, probs * (1.0 / 0.9), torch.zeros((), dtype=dtype)) @ v
        assert torch.equal(got, want)


def test_dropout_mask_kept_as_one_byte_and_gradient_exact_in_bf16():
    p = 0.1
    x = torch.randn(6, 40, 24).to(BF16).requires_grad_()
    torch.manual_seed(11)
    out = dropout(x, p)
    (kept,) = out.grad_fn.saved_tensors
    assert kept.dtype == torch.uint8 and kept.element_size() == 1
    g = torch.randn(out.shape).to(BF16)
    out.backward(g)
    torch.manual_seed(11)
    keep = keep_mask(x.shape, p)
    scale = torch.tensor(1.0 / (1.0 - p))
    assert torch.equal(x.grad, torch.where(keep, (g.float() * scale).to(BF16), torch.zeros((), dtype=BF16)))
