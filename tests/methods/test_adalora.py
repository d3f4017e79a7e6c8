"""AdaLoRA against the float64 formula and against Hugging Face PEFT: forward, merge, the orthogonality
penalty, the budget schedule, one allocation on identical scores, and a whole training run."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import deltatune as dt
from deltatune.methods.adalora import adalora_layers, allocate, budget_schedule, orthogonal_regularization, ranks
from tests.models import ZOO

R0 = 6  # init rank used against PEFT
# PEFT scales by α / (r + 1e-5); ours by α / r. Choosing α so both scales agree isolates everything else.
ALPHA = 8.0 * R0 / (R0 + 1e-5)


def _pair(zoo, targets, *, total=12, tinit=2, tfinal=3, fan_in_fan_out=False):
    from peft import AdaLoraConfig, get_peft_model

    model = zoo.build()
    peft_model = get_peft_model(copy.deepcopy(model), AdaLoraConfig(
        init_r=R0, target_r=3, lora_alpha=8, total_step=total, tinit=tinit, tfinal=tfinal, deltaT=1,
        target_modules=targets, fan_in_fan_out=fan_in_fan_out))
    dt.attach(model, dt.AdaLoraConfig(target=targets, init_rank=R0, target_rank=3, alpha=ALPHA,
                                      tinit=tinit, tfinal=tfinal))
    return model, peft_model


def _theirs(peft_model, layer_name):
    return peft_model.base_model.model.get_submodule(layer_name)


def _copy_in(peft_model, model):
    """P = lora_B, λ = lora_E, Q = lora_A."""
    with torch.no_grad():
        for layer_name, ours in adalora_layers(model).items():
            theirs = _theirs(peft_model, layer_name)
            ours.P.copy_(theirs.lora_B["default"])
            ours.Q.copy_(theirs.lora_A["default"])
            ours.Lambda.copy_(theirs.lora_E["default"].view(-1))


CASES = {
    "linear": ("mlp", ["fc1", "fc2"]),
    "gpt2-conv1d": ("gpt2", ["c_attn", "c_fc"]),
    "conv2d": ("cnn", ["conv1", "conv2"]),
}


@pytest.mark.parametrize("kind", list(CASES))
def test_matches_peft_merged_and_unmerged(kind):
    zoo_name, targets = CASES[kind]
    zoo = ZOO[zoo_name]
    model, peft_model = _pair(zoo, targets, fan_in_fan_out=kind == "gpt2-conv1d")
    peft_model.eval()
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_E" in n:
                p.normal_(0, 1.0)
    _copy_in(peft_model, model)
    expected = zoo.run(peft_model)
    assert not torch.allclose(expected, zoo.run(zoo.build()), atol=1e-4)  # the adapters do something
    torch.testing.assert_close(zoo.run(model), expected, rtol=1e-5, atol=1e-6)
    dt.merge(model)
    peft_model.merge_adapter()
    torch.testing.assert_close(zoo.run(model), zoo.run(peft_model), rtol=1e-5, atol=1e-6)


def test_matches_the_float64_formula_with_a_mask():
    model = torch.nn.Sequential(torch.nn.Linear(7, 5)).double()
    dt.attach(model, dt.AdaLoraConfig(target=["0"], init_rank=4, target_rank=2, alpha=3.0))
    ad = model[0].adapters["default"]
    with torch.no_grad():
        ad.Lambda.normal_()
        ad.mask.copy_(torch.tensor([True, False, True, True]))
    kept = ad.Lambda.detach() * torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    delta = (3.0 / 4) * ad.P @ torch.diag(kept) @ ad.Q  # (α / r) P Λ Q
    x = torch.randn(2, 3, 7, dtype=torch.float64)
    base = model[0].base
    torch.testing.assert_close(model(x), x @ (base.weight + delta).T + base.bias, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ad.delta_weight(base), delta, rtol=1e-12, atol=1e-12)


def test_orthogonal_regularization_matches_the_formula_and_peft():
    zoo = ZOO["bert"]
    model, peft_model = _pair(zoo, ["query", "value"])
    _copy_in(peft_model, model)
    terms = []
    for ad in adalora_layers(model).values():
        P, Q = ad.P.double(), ad.Q.double()
        eye = torch.eye(R0, dtype=torch.float64)
        terms += [torch.linalg.norm(Q @ Q.T - eye), torch.linalg.norm(P.T @ P - eye)]
    torch.testing.assert_close(orthogonal_regularization(model).double(), torch.stack(terms).mean(), rtol=1e-6, atol=0)

    labels = torch.tensor([0, 2, 1])
    inputs = {**zoo.inputs(), "labels": labels}
    theirs = peft_model.base_model(**inputs).loss  # AdaLoraModel.forward adds 0.5 · penalty to the task loss
    ours = model(**inputs).loss + dt.regularization_loss(model)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    with dt.using(model, ()):
        dt.mark_trainable(model, [])
        assert dt.regularization_loss(model) is None  # no penalty for an adapter that does not train


def test_budget_schedule_matches_peft():
    from peft.tuners.adalora.layer import RankAllocator

    for total, tinit, tfinal, delta_t in [(20, 3, 5, 1), (50, 0, 0, 4), (17, 5, 2, 3)]:
        fake = SimpleNamespace(peft_config=SimpleNamespace(tinit=tinit, tfinal=tfinal, total_step=total, deltaT=delta_t),
                               init_bgt=72, target_bgt=24)
        for step in range(total + 2):
            assert budget_schedule(step, total, 72, 24, tinit, tfinal, delta_t) == \
                RankAllocator.budget_schedule(fake, step), (total, tinit, tfinal, delta_t, step)


def test_one_allocation_on_identical_scores_matches_peft():
    zoo = ZOO["mlp"]
    model, peft_model = _pair(zoo, ["fc1", "fc2"])
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_E" in n:
                p.normal_()
    _copy_in(peft_model, model)
    allocator = peft_model.base_model.rankallocator
    g = torch.Generator().manual_seed(3)
    for n, p in peft_model.base_model.model.named_parameters():
        if "lora_" in n:
            allocator.exp_avg_ipt[n] = torch.rand(p.shape, generator=g)
            allocator.exp_avg_unc[n] = torch.rand(p.shape, generator=g)
    for layer_name, ad in adalora_layers(model).items():
        for ours, theirs in (("P", "lora_B"), ("Lambda", "lora_E"), ("Q", "lora_A")):
            key = f"{layer_name}.{theirs}.default"
            ad.importance[ours] = (allocator.exp_avg_ipt[key].view(getattr(ad, ours).shape),
                                   allocator.exp_avg_unc[key].view(getattr(ad, ours).shape))
    allocator.mask_to_budget(peft_model.base_model.model, 7)
    allocate(list(adalora_layers(model).values()), 7)
    for layer_name, ad in adalora_layers(model).items():
        theirs = _theirs(peft_model, layer_name).lora_E["default"].view(-1)
        assert torch.equal(ad.Lambda != 0, theirs != 0)
        torch.testing.assert_close(ad.Lambda.detach(), theirs.detach(), rtol=0, atol=0)
    assert sum(int((ad.Lambda != 0).sum()) for ad in adalora_layers(model).values()) == 7


def test_training_run_allocates_ranks_like_peft():
    zoo = ZOO["mlp"]
    total = 12
    model, peft_model = _pair(zoo, ["fc1", "fc2"], total=total)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_E" in n:
                p.normal_(0, 0.5)
    _copy_in(peft_model, model)
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(5))
    y = torch.randn(32, 4, generator=torch.Generator().manual_seed(6))
    pairs = [(m, torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)) for m in (peft_model, model)]
    for step in range(1, total + 1):
        for m, opt in pairs:
            F.mse_loss(m(x), y).backward()
            opt.step()
        peft_model.base_model.update_and_allocate(step)
        dt.on_train_step(model, step, total)
        for _, opt in pairs:
            opt.zero_grad()
        for layer_name, ad in adalora_layers(model).items():
            theirs = _theirs(peft_model, layer_name).lora_E["default"].view(-1)
            assert torch.equal(ad.values() != 0, theirs != 0), (step, layer_name)
        torch.testing.assert_close(model(x), peft_model(x), rtol=1e-5, atol=1e-6)
    pattern = peft_model.peft_config["default"].rank_pattern
    assert ranks(model) == {n: sum(pattern[f"{n}.lora_E.default"]) for n in ("fc1", "fc2")}
    assert sum(ranks(model).values()) == 3 * 2  # target_rank · layers


def _train(model, zoo, total):
    """A training loop as deltatune's own: task loss + regularization_loss, then on_train_step."""
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.01)
    for step in range(1, total + 1):
        loss = zoo.run(model).pow(2).mean()
        reg = dt.regularization_loss(model)
        (loss + reg).backward()
        opt.step()
        dt.on_train_step(model, step, total)
        opt.zero_grad()
    model.eval()


def test_final_ranks_are_saved_reloaded_and_merged(tmp_path):
    zoo = ZOO["llama"]
    model = zoo.build()
    dt.attach(model, dt.AdaLoraConfig(init_rank=4, target_rank=2, tinit=1, tfinal=2))
    _train(model, zoo, total=8)
    final = ranks(model)
    assert sum(final.values()) == 2 * len(final) and len(set(final.values())) > 1  # moved between layers
    # After the final allocation the mask holds the ranks, whatever the optimizer does to λ.
    with torch.no_grad():
        for ad in adalora_layers(model).values():
            ad.Lambda.add_(1.0)
    expected = zoo.run(model)
    dt.save_adapter(model, tmp_path / "a")
    fresh = zoo.build()
    dt.load_adapter(fresh, tmp_path / "a")
    assert ranks(fresh) == final
    torch.testing.assert_close(zoo.run(fresh), expected, rtol=0, atol=0)
    dt.merge(fresh)
    torch.testing.assert_close(zoo.run(fresh), expected, rtol=0, atol=1e-5)


def test_step_hook_needs_gradients_and_a_valid_schedule():
    zoo = ZOO["mlp"]
    model = zoo.build()
    dt.attach(model, dt.AdaLoraConfig(target=["fc1", "fc2"], tinit=3, tfinal=3))
    with pytest.raises(ValueError, match="tinit \\+ tfinal < total_steps"):
        dt.on_train_step(model, 1, 6)
    with pytest.raises(RuntimeError, match="before optimizer.zero_grad"):
        dt.on_train_step(model, 1, 100)
    dt.mark_trainable(model, [])
    dt.on_train_step(model, 1, 100)  # an adapter that does not train is left alone


def test_defaults_and_bad_config():
    config = dt.AdaLoraConfig()
    assert (config.init_rank, config.target_rank, config.alpha, config.beta1, config.orth_reg_weight) == \
        (12, 8, 8.0, 0.85, 0.5)
    model = ZOO["bert"].build()
    dt.attach(model, config)
    ad = next(iter(adalora_layers(model).values()))
    assert torch.count_nonzero(ad.Lambda) == 0 and 0.01 < ad.P.std().item() < 0.03  # identity, N(0, 0.02)
    with pytest.raises(ValueError, match="target_rank <= init_rank"):
        dt.AdaLoraConfig(init_rank=4, target_rank=8)
    with pytest.raises(ValueError, match="beta1 and beta2"):
        dt.AdaLoraConfig(beta1=1.0)
    with pytest.raises(ValueError, match="delta_t >= 1"):
        dt.AdaLoraConfig(delta_t=0)


def test_inside_a_hybrid_the_schedule_and_penalty_find_their_layers():
    from deltatune.config import HybridConfig

    zoo = ZOO["bert"]
    model = zoo.build()
    part = dt.AdaLoraConfig(target=["query", "value"], init_rank=4, target_rank=2, tfinal=1)
    dt.attach(model, HybridConfig(parts=(dt.LoraConfig(target=["query"], rank=2), part)))
    layers = adalora_layers(model)
    assert len(layers) == 4 and layers == adalora_layers(model, config=part)
    torch.testing.assert_close(dt.regularization_loss(model), 0.5 * orthogonal_regularization(model))
    _train(model, zoo, total=4)
    assert sorted(ranks(model)) == sorted(layers) and sum(ranks(model).values()) == 2 * 4
