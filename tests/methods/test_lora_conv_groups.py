"""LoRA (and DoRA) on grouped, depthwise and 1×1 convolutions: the float64 formula, an exact merge,
and the ``all-conv`` target."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deltatune as dt
from tests.models import one_layer

CONVS = {
    "depthwise": lambda: nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),
    "depthwise-x2": lambda: nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=4),
    "grouped": lambda: nn.Conv2d(8, 12, 3, padding=1, groups=4),
    "pointwise": lambda: nn.Conv2d(8, 16, 1, bias=False),
    "grouped-1d": lambda: nn.Conv1d(6, 6, 3, padding=1, groups=3),
}


def _x(conv: nn.Module) -> torch.Tensor:
    shape = (2, conv.in_channels, 7, 7) if isinstance(conv, nn.Conv2d) else (2, conv.in_channels, 9)
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kind", CONVS)
def test_grouped_lora_matches_the_per_group_formula(kind: str) -> None:
    torch.manual_seed(0)
    conv = CONVS[kind]()
    model, adapter = one_layer(copy.deepcopy(conv), dt.LoraConfig(target=["0"], rank=2, alpha=3.0))
    g = conv.groups
    x = _x(conv)
    base = model[0].base
    # per group j: W_j + s · B_j A_j, written out with plain loops over the groups
    per_in, per_out, r = conv.in_channels // g, conv.out_channels // g, adapter.rank
    assert r == (min(2, per_out, per_in * 9 if "1d" not in kind else per_in * 3) if g > 1 else 2)
    delta = torch.cat([
        (adapter.B[j * per_out:(j + 1) * per_out].flatten(1) @ adapter.A[j * r:(j + 1) * r].flatten(1))
        .view(per_out, *conv.weight.shape[1:]) for j in range(g)]) * adapter.scaling
    fn = F.conv2d if isinstance(conv, nn.Conv2d) else F.conv1d
    want = fn(x, base.weight + delta, base.bias, conv.stride, conv.padding, conv.dilation, g)
    with torch.no_grad():
        got = model(x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(adapter.delta_weight(base), delta, rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", [dt.LoraConfig, dt.DoraConfig])
@pytest.mark.parametrize("kind", CONVS)
def test_merge_is_exact_and_gradients_reach_both_factors(kind: str, method: type) -> None:
    torch.manual_seed(0)
    model, adapter = one_layer(CONVS[kind](), method(target=["0"], rank=2))
    x = _x(model[0].base)
    model.train()
    model(x).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.parameters())
    model.eval()
    with torch.no_grad():
        before = model(x)
        dt.merge_and_unload(model)
        after = model(x)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-10)


def test_all_conv_targets_every_convolution_and_only_those() -> None:
    from deltatune.train.image_models import MobileNetV2

    model = MobileNetV2(10)
    report = dt.attach(model, dt.LoraConfig(target="all-conv", rank=4))
    convs = [n for n, m in MobileNetV2(10).named_modules() if isinstance(m, nn.Conv2d)]
    assert report.targets == convs and len(convs) == 52
