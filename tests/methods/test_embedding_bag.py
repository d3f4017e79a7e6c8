"""``nn.EmbeddingBag`` as a layer kind (LoRA and token rows on it) and ``grow_table`` for new IDs.

A bag in sum or mean mode is linear in its table, so an adapter that adds ``ΔE`` to the table must
give exactly the bag over ``E + ΔE``: that is the float64 definition every test compares with.
PEFT has no LoRA for bags; its LoRA on an ``nn.Embedding`` with the same weights, reduced per bag,
is the parity check.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deltatune as dt
from deltatune.methods.lora import LoraEmbeddingBag
from deltatune.methods.tokens import TokenRowsBag

V, D = 40, 8


class BagModel(nn.Module):
    """A multi-hot feature bag followed by a small head, as in a CTR model."""

    def __init__(self, mode: str = "mean", padding_idx: int | None = None, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.features = nn.EmbeddingBag(V, D, mode=mode, padding_idx=padding_idx)
        self.head = nn.Linear(D, 3)

    def forward(self, ids, offsets=None, per_sample_weights=None):
        return self.head(self.features(ids, offsets, per_sample_weights=per_sample_weights))


IDS = torch.tensor([1, 5, 7, 0, 5, 39, 2, 2, 11, 0])
OFFSETS = torch.tensor([0, 3, 4, 7])  # four bags: [1 5 7] [0] [5 39 2] [2 11 0]
WEIGHTS = torch.linspace(0.5, 2.0, IDS.numel())


def _reference(model: BagModel, table: torch.Tensor, psw=None) -> torch.Tensor:
    """The model with its bag's table replaced by ``table``, in float64."""
    bag = model.features.base if isinstance(model.features, dt.AdaptedLayer) else model.features
    h = F.embedding_bag(IDS, table.double(), OFFSETS, mode=bag.mode, per_sample_weights=None if psw is None else
                        psw.double(), padding_idx=bag.padding_idx)
    return F.linear(h, model.head.weight.double(), model.head.bias.double())


def _randomise(model: nn.Module) -> None:
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(hash(n) % 1000))


CASES = [("sum", None, False), ("mean", None, False), ("mean", 0, False), ("sum", 0, True)]


@pytest.mark.parametrize("mode,padding_idx,weighted", CASES)
def test_lora_on_a_bag_is_the_bag_of_the_updated_table(mode, padding_idx, weighted):
    model = BagModel(mode, padding_idx)
    base_table = model.features.weight.detach().clone()
    dt.attach(model, dt.LoraConfig(target="features", rank=3, alpha=6.0))
    ad = model.features.adapters["default"]
    assert isinstance(ad, LoraEmbeddingBag)
    _randomise(model)
    psw = WEIGHTS if weighted else None
    expected = _reference(model, base_table.double() + (ad.B.double() @ ad.A.double()).t() * ad.scaling, psw)
    torch.testing.assert_close(model(IDS, OFFSETS, psw).double(), expected, rtol=1e-5, atol=1e-6)
    dt.merge(model)
    torch.testing.assert_close(model(IDS, OFFSETS, psw).double(), expected, rtol=1e-5, atol=1e-6)
    dt.unmerge(model)  # W + ΔW - ΔW: equal up to rounding (the attached base itself never changed)
    torch.testing.assert_close(model.features.base.weight, base_table, rtol=0, atol=1e-6)


def test_lora_on_a_bag_takes_two_dimensional_input_and_keyword_offsets():
    model = BagModel("mean")
    dt.attach(model, dt.LoraConfig(target="features", rank=2))
    _randomise(model)
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    flat = model(ids.flatten(), offsets=torch.tensor([0, 3]))
    torch.testing.assert_close(model(ids), flat, rtol=0, atol=1e-6)


def test_lora_on_a_bag_matches_peft_lora_on_the_same_embedding_reduced_per_bag():
    from peft import LoraConfig, get_peft_model

    model = BagModel("sum")
    emb = nn.Sequential()
    emb.table = nn.Embedding(V, D)
    with torch.no_grad():
        emb.table.weight.copy_(model.features.weight)
    peft_emb = get_peft_model(emb, LoraConfig(r=4, lora_alpha=8, target_modules=["table"], init_lora_weights=False))
    dt.attach(model, dt.LoraConfig(target="features", rank=4, alpha=8.0))
    theirs = peft_emb.base_model.model.table
    ours = model.features.adapters["default"]
    with torch.no_grad():
        theirs.lora_embedding_A["default"].normal_(0, 0.3)
        ours.A.copy_(theirs.lora_embedding_A["default"])
        ours.B.copy_(theirs.lora_embedding_B["default"])
    rows = theirs(IDS)                                             # (n, d): PEFT's LoRA lookup
    bag_of = torch.repeat_interleave(torch.arange(4), torch.diff(OFFSETS, append=torch.tensor([IDS.numel()])))
    expected = torch.zeros(4, D).index_add_(0, bag_of, rows)      # summed per bag
    torch.testing.assert_close(model.features(IDS, OFFSETS), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode,padding_idx,weighted", CASES)
def test_token_rows_on_a_bag_replace_the_rows_in_the_reduction(mode, padding_idx, weighted):
    model = BagModel(mode, padding_idx)
    base_table = model.features.weight.detach().clone()
    dt.attach(model, dt.TokensConfig(target="features", token_ids=(0, 2, 5)))
    ad = model.features.adapters["default"]
    assert isinstance(ad, TokenRowsBag)
    _randomise(model)
    table = base_table.clone()
    table[ad.token_ids] = ad.rows.detach()
    psw = WEIGHTS if weighted else None
    expected = _reference(model, table, psw)
    torch.testing.assert_close(model(IDS, OFFSETS, psw).double(), expected, rtol=1e-5, atol=1e-6)
    dt.merge(model)
    torch.testing.assert_close(model(IDS, OFFSETS, psw).double(), expected, rtol=1e-5, atol=1e-6)
    dt.unmerge(model)
    assert torch.equal(model.features.base.weight, base_table)


def test_adapters_on_a_bag_train_only_themselves_and_reload_exactly(tmp_path):
    for config in (dt.LoraConfig(target="features", rank=2), dt.TokensConfig(target="features", token_ids=(5, 7))):
        model = BagModel("mean", 0)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        dt.attach(model, config)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        model(IDS, OFFSETS).pow(2).sum().backward()
        opt.step()
        for name, p in model.named_parameters():
            if "features.base" in name:
                assert torch.equal(p, before[name.replace(".base", "")])
        out = model(IDS, OFFSETS)
        dt.save_adapter(model, tmp_path / config.method)
        fresh = BagModel("mean", 0)
        dt.load_adapter(fresh, tmp_path / config.method)
        torch.testing.assert_close(fresh(IDS, OFFSETS), out, rtol=0, atol=0)


def test_a_max_bag_and_max_norm_are_refused_with_the_fix():
    for config in (dt.LoraConfig(target="features"), dt.TokensConfig(target="features", token_ids=(1,))):
        with pytest.raises(ValueError, match="mode='sum' or 'mean'"):
            dt.attach(BagModel("max"), config)
        model = BagModel("sum")
        model.features.max_norm = 1.0
        with pytest.raises(ValueError, match="max_norm=None"):
            dt.attach(model, config)


class Items(nn.Module):
    def __init__(self, n: int = 30, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.items = nn.Embedding(n, D, padding_idx=0)
        self.proj = nn.Linear(D, D)

    def forward(self, ids):
        return self.proj(self.items(ids)) @ self.items.weight.t()  # scores against every item


def test_grow_table_keeps_old_rows_bit_identical_and_trains_only_the_new_ones(tmp_path):
    model = Items()
    old_table = model.items.weight.detach().clone()
    old = dt.grow_table(model, "items", 5)
    assert old == 30 and model.items.weight.shape == (35, D) and model.items.padding_idx == 0
    assert torch.equal(model.items.weight[:30], old_table)
    torch.testing.assert_close(model.items.weight[30:], old_table.mean(0).expand(5, D))
    report = dt.attach(model, dt.TokensConfig(target="items", original_vocab_size=old))
    assert report.trainable_parameters == 5 * D  # the new rows only: attach froze the rest
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ids = torch.tensor([3, 31, 34, 7])
    for _ in range(3):
        opt.zero_grad()
        model.items(ids).pow(2).sum().backward()
        opt.step()
    assert torch.equal(model.items.base.weight[:30], old_table)  # frozen, bit-identical
    rows = model.items.adapters["default"].rows
    assert not torch.equal(rows[[1, 4]], old_table.mean(0).expand(2, D))  # the touched new rows trained
    out = model.items(ids)
    dt.save_adapter(model, tmp_path / "a")

    fresh = Items()
    dt.grow_table(fresh, "items", 5)
    dt.load_adapter(fresh, tmp_path / "a")
    torch.testing.assert_close(fresh.items(ids), out, rtol=0, atol=0)
    dt.merge(fresh)  # unmerged the rows enter as E + (R - E): equal up to rounding
    torch.testing.assert_close(fresh.items(ids), out, rtol=0, atol=1e-6)
    assert torch.equal(fresh.items.base.weight[:30], old_table)  # merging writes the new rows only


def test_grow_table_on_a_bag_and_its_errors():
    model = BagModel("sum")
    dt.grow_table(model, "features", 2)
    assert isinstance(model.features, nn.EmbeddingBag) and model.features.mode == "sum"
    assert model.features.weight.shape == (V + 2, D)
    with pytest.raises(ValueError, match="new_rows must be >= 1"):
        dt.grow_table(model, "features", 0)
    with pytest.raises(ValueError, match="not an nn.Embedding"):
        dt.grow_table(model, "head", 1)
    with pytest.raises(ValueError, match="no module 'nope'"):
        dt.grow_table(model, "nope", 1)
    tied = copy.deepcopy(model)
    tied.head = nn.Linear(D, V + 2)
    tied.head.weight = tied.features.weight
    with pytest.raises(ValueError, match="shares its weight with 'head.weight'"):
        dt.grow_table(tied, "features", 1)
    dt.attach(model, dt.LoraConfig(target="features"))
    with pytest.raises(ValueError, match="grow the table first"):
        dt.grow_table(model, "features", 1)
