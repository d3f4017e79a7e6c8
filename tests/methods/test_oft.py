"""OFT against the float64 formula and against Hugging Face PEFT on identical weights."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import deltatune as dt
from deltatune.core.records import adapted_layers
from deltatune.methods.oft import cayley, nearest_divisor
from tests.models import ZOO


def _adapters(model, name="default"):
    return {n: layer.adapters[name] for n, layer in adapted_layers(model) if name in layer.adapters}


def _peft_pair(zoo, targets, *, block_size=8, neumann=0, block_share=False, coft=False, eps=0.05):
    """(ours, PEFT's) on identical weights; PEFT's q random, copied into ours (negated in Neumann mode)."""
    from peft import OFTConfig, get_peft_model

    model = zoo.build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # both sides move block sizes that do not divide a layer
        peft_model = get_peft_model(copy.deepcopy(model), OFTConfig(
            r=0, oft_block_size=block_size, target_modules=targets, block_share=block_share, coft=coft, eps=eps,
            use_cayley_neumann=neumann > 0, num_cayley_neumann_terms=neumann + 1 if neumann else 5)).eval()
        dt.attach(model, dt.OftConfig(target=targets, block_size=block_size, neumann_terms=neumann,
                                      block_share=block_share, coft=coft, eps=eps))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "oft_R" in n:
                p.normal_(0, 0.1)
        for layer_name, ours in _adapters(model).items():
            theirs = peft_model.base_model.model.get_submodule(layer_name).oft_R["default"]
            assert ours.block_size == theirs.block_size
            ours.q.copy_(-theirs.weight if neumann else theirs.weight)
    return model, peft_model


CASES = {
    "exact": dict(zoo="mlp", targets=["fc1", "fc2"]),
    "exact-odd-sizes": dict(zoo="bert", targets=["query", "output.dense"]),  # 37 features: one block of 37
    "neumann": dict(zoo="llama", targets=["q_proj", "down_proj"], neumann=4),  # PEFT's default mode
    "block-share": dict(zoo="mlp", targets=["fc1", "fc2"], block_share=True),
    "coft": dict(zoo="mlp", targets=["fc1", "fc2"], coft=True),
}


@pytest.mark.parametrize("kind", list(CASES))
def test_matches_peft_merged_and_unmerged(kind):
    case = dict(CASES[kind])
    zoo = ZOO[case.pop("zoo")]
    model, peft_model = _peft_pair(zoo, case.pop("targets"), **case)
    expected = zoo.run(peft_model)
    assert not torch.allclose(expected, zoo.run(zoo.build()), atol=1e-5)  # the adapters do something
    torch.testing.assert_close(zoo.run(model), expected, rtol=1e-5, atol=1e-6)
    dt.merge(model)
    peft_model.merge_adapter()
    torch.testing.assert_close(zoo.run(model), zoo.run(peft_model), rtol=1e-5, atol=1e-6)


def test_conv_matches_peft_merged_weight():
    """PEFT's unmerged conv forward folds overlapping patches (see the module docstring); its merged
    weight is W R, which is what our forward computes, merged or not."""
    zoo = ZOO["cnn"]
    model, peft_model = _peft_pair(zoo, ["conv1", "conv2"], block_size=9)
    unmerged = zoo.run(model)
    peft_model.merge_adapter()
    torch.testing.assert_close(unmerged, zoo.run(peft_model), rtol=1e-5, atol=1e-6)
    dt.merge(model)
    torch.testing.assert_close(zoo.run(model), zoo.run(peft_model), rtol=1e-5, atol=1e-6)


def test_pointwise_conv_matches_peft_unmerged():
    from peft import OFTConfig, get_peft_model

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 6, 1, stride=2))
    peft_model = get_peft_model(copy.deepcopy(model), OFTConfig(r=0, oft_block_size=4, target_modules=["0"],
                                                                use_cayley_neumann=False))
    dt.attach(model, dt.OftConfig(target=["0"], block_size=4))
    with torch.no_grad():
        peft_model.base_model.model[0].oft_R["default"].weight.normal_(0, 0.3)
        model[0].adapters["default"].q.copy_(peft_model.base_model.model[0].oft_R["default"].weight)
    x = torch.randn(2, 8, 5, 5)
    torch.testing.assert_close(model(x), peft_model(x), rtol=1e-5, atol=1e-6)


def _block_diag(adapter) -> torch.Tensor:
    """R from the definition, in float64: diag over blocks of (I + Q_i)(I − Q_i)⁻¹."""
    k = adapter.block_size
    blocks = []
    for q in adapter.q.detach().double():
        U = torch.zeros(k, k, dtype=torch.float64)
        U[torch.triu_indices(k, k, 1).unbind()] = q
        Q = U - U.T
        eye = torch.eye(k, dtype=torch.float64)
        blocks.append((eye + Q) @ torch.linalg.inv(eye - Q))
    blocks = blocks * adapter.num_blocks if len(blocks) == 1 else blocks
    return torch.block_diag(*blocks)


@pytest.mark.parametrize("block_share", [False, True])
def test_linear_matches_the_float64_formula(block_share):
    model = torch.nn.Sequential(torch.nn.Linear(12, 5)).double()
    dt.attach(model, dt.OftConfig(target=["0"], block_size=4, block_share=block_share))
    ad = model[0].adapters["default"]
    assert ad.q.shape == (1 if block_share else 3, 6)
    with torch.no_grad():
        ad.q.normal_(0, 0.5)
    R = _block_diag(ad)
    torch.testing.assert_close(R.T @ R, torch.eye(12, dtype=torch.float64), rtol=0, atol=1e-12)  # orthogonal
    W, b = model[0].base.weight.detach().clone(), model[0].base.bias
    x = torch.randn(3, 2, 12, dtype=torch.float64)
    torch.testing.assert_close(model(x), x @ (W @ R).T + b, rtol=1e-12, atol=1e-12)
    dt.merge(model)
    torch.testing.assert_close(model[0].base.weight, W @ R, rtol=1e-12, atol=1e-12)
    dt.unmerge(model)
    torch.testing.assert_close(model[0].base.weight, W, rtol=1e-12, atol=1e-12)


def test_gpt2_conv1d_and_conv_match_the_float64_formula():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"lin": Conv1D(5, 8), "conv": torch.nn.Conv2d(2, 3, 3, padding=1)}).double()
    dt.attach(model, dt.OftConfig(target=["lin", "conv"], block_size=2))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)
    lin, conv = model["lin"], model["conv"]
    x = torch.randn(4, 8, dtype=torch.float64)
    R = _block_diag(lin.adapters["default"])
    torch.testing.assert_close(lin(x), x @ R.T @ lin.base.weight + lin.base.bias, rtol=1e-12, atol=1e-12)
    img = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    Rc = _block_diag(conv.adapters["default"])  # rotates the 2·3·3 = 18 flattened filter features
    weight = (conv.base.weight.flatten(1) @ Rc).view_as(conv.base.weight)
    torch.testing.assert_close(conv(img), F.conv2d(img, weight, conv.base.bias, padding=1), rtol=1e-12, atol=1e-12)


def test_neumann_series_approximates_the_cayley_transform():
    Q = torch.randn(3, 4, 4, dtype=torch.float64) * 0.05
    Q = Q - Q.transpose(-1, -2)
    exact = cayley(Q)
    errors = [(cayley(Q, t) - exact).abs().max().item() for t in (1, 2, 4, 8)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-5


def test_unmerge_restores_the_base_in_neumann_mode_too():
    zoo = ZOO["llama"]
    model = zoo.build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dt.attach(model, dt.OftConfig(neumann_terms=3))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)
    expected = zoo.run(model)
    dt.merge(model)
    torch.testing.assert_close(zoo.run(model), expected, rtol=0, atol=1e-5)
    dt.unmerge(model)
    dt.detach(model)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=1e-6)


def test_block_sizes_move_to_the_nearest_divisor_like_peft():
    from peft.tuners.oft.layer import OFTLayer

    for n in (1, 7, 12, 37, 48, 72, 96, 100, 768):
        for want in (1, 2, 3, 5, 8, 16, 24, 32, 64, 1000):
            assert nearest_divisor(n, want) == OFTLayer.adjust_oft_parameters(None, n, want), (n, want)
    model = ZOO["bert"].build()
    with pytest.warns(UserWarning, match="does not fit the 37 input features of .*output.dense.*1 blocks of 37"):
        dt.attach(model, dt.OftConfig(target=["output.dense"]))
    model = ZOO["mlp"].build()
    dt.attach(model, dt.OftConfig(target=["fc2"], block_size=0, num_blocks=4))
    assert (model.fc2.adapters["default"].num_blocks, model.fc2.adapters["default"].block_size) == (4, 8)


def test_coft_keeps_every_block_in_its_ball():
    model = ZOO["mlp"].build()
    dt.attach(model, dt.OftConfig(target=["fc2"], block_size=8, coft=True, eps=0.01))
    ad = model.fc2.adapters["default"]
    with torch.no_grad():
        ad.q.normal_()
    x = torch.randn(3, 32)
    projected = ad.project(ad.q.detach())
    radius = 0.01 / math.sqrt(ad.q.shape[0])
    assert torch.all(torch.linalg.matrix_norm(ad.skew(projected)) <= radius * (1 + 1e-6))
    out = model.fc2(x)  # the forward already uses the projected q ...
    dt.on_train_step(model, 1, 10)  # ... and the step hook writes it back
    torch.testing.assert_close(ad.q.detach(), projected)
    torch.testing.assert_close(model.fc2(x), out)


def test_module_dropout_turns_blocks_into_identities_in_training_only():
    model = ZOO["mlp"].build()
    dt.attach(model, dt.OftConfig(target=["fc2"], block_size=4, module_dropout=0.5))
    ad = model.fc2.adapters["default"]
    with torch.no_grad():
        ad.q.normal_()
    eye = torch.eye(4)
    model.train()
    identities = [(b - eye).abs().max().item() == 0 for b in ad.blocks()]
    assert sum(identities) == 4  # int(0.5 · 8) of the 8 blocks
    model.eval()
    assert not any((b - eye).abs().max().item() == 0 for b in ad.blocks())


def test_only_q_is_trained_and_saved(tmp_path):
    zoo = ZOO["gpt2"]
    model = zoo.build()
    report = dt.attach(model, dt.OftConfig(block_size=8))
    assert {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad} == {"q"}
    assert report.adapter_parameters == sum(a.q.numel() for a in _adapters(model).values())
    dt.save_adapter(model, tmp_path / "o")
    tensors, _, _ = dt.core.stored.adapter_state(model, "default")
    assert {k.rsplit(".", 1)[-1] for k in tensors} == {"q"}


def test_bad_config_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="block_size=0 to size by num_blocks"):
        dt.OftConfig(num_blocks=4)
    with pytest.raises(ValueError, match="exactly one of block_size and num_blocks"):
        dt.OftConfig(block_size=0)
    with pytest.raises(ValueError, match="module_dropout"):
        dt.OftConfig(module_dropout=1.0)
    with pytest.raises(ValueError, match="groups=1"):
        dt.attach(torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, groups=2)), dt.OftConfig(target=["0"]))
