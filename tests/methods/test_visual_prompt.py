"""Visual prompting (padding): the float64 formula, resizing to other input sizes, where it attaches."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.methods import METHODS
from tests.models import ZOO, one_layer

VisualPromptConfig = METHODS["visual_prompt"]


def test_prompt_is_added_on_the_border_only_float64() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    model, adapter = one_layer(conv, VisualPromptConfig(target=["0"], size=12, pad=3))
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    v = torch.zeros(3, 12, 12, dtype=torch.float64)
    v[:, :3, :] = adapter.top
    v[:, -3:, :] = adapter.bottom
    v[:, 3:-3, :3] = adapter.left
    v[:, 3:-3, -3:] = adapter.right
    assert v[:, 3:-3, 3:-3].abs().sum() == 0 and v[:, :3].abs().sum() > 0
    with torch.no_grad():
        torch.testing.assert_close(model(x), model[0].base(x + v), rtol=0, atol=1e-12)
    assert sum(p.numel() for p in adapter.parameters()) == 3 * (2 * 3 * 12 + 2 * 6 * 3)


def test_other_input_sizes_get_the_prompt_resized() -> None:
    model, adapter = one_layer(nn.Conv2d(3, 4, 3), VisualPromptConfig(target=["0"], size=16, pad=4))
    v = adapter.prompt(32, 32)
    assert v.shape == (3, 32, 32) and v[:, 12:20, 12:20].abs().max() < 1e-12  # the centre stays unprompted
    model(torch.randn(1, 3, 32, 32, dtype=torch.float64))


@pytest.mark.parametrize("zoo_name,first", [("cnn", "conv1"), ("resnet", "conv1"), ("vit", "patch_embed")])
def test_attaches_to_the_layer_that_reads_the_picture_and_only_the_prompt_trains(zoo_name: str, first: str) -> None:
    zoo = ZOO[zoo_name]
    model = zoo.build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = dt.attach(model, VisualPromptConfig(size=16, pad=2))
    assert report.targets == [first]
    torch.testing.assert_close(zoo.run(model), zoo.run(zoo.build()))  # zero prompt: the base model
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    zoo.run(model).square().mean().backward()
    opt.step()
    after = {k: v for k, v in model.state_dict().items() if ".adapters." not in k}
    assert all(torch.equal(before[k.replace(".base.", ".")], v) for k, v in after.items())
    assert not torch.allclose(zoo.run(model.eval()), zoo.run(zoo.build()))


def test_no_picture_input_and_bad_sizes_are_refused() -> None:
    with pytest.raises(dt.NoMatchError, match="no 2-D convolution"):
        dt.attach(ZOO["mlp"].build(), VisualPromptConfig())
    with pytest.raises(ValueError, match="pad < size / 2"):
        VisualPromptConfig(pad=8, size=16)
    model = ZOO["cnn"].build()
    dt.attach(model, VisualPromptConfig())
    with pytest.raises(ValueError, match="cannot be merged"):
        dt.merge_and_unload(model)
