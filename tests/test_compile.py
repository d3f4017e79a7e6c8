"""``torch.compile(fullgraph=True)`` captures adapted models whole: no graph breaks, same numbers.

The ``aot_eager`` backend runs dynamo's capture and AOTAutograd's tracing of the backward (where
graph breaks and untraceable autograd functions show up) without inductor's C++ build, which
takes minutes on two cores; the generated code is not what these tests are about.
"""

from __future__ import annotations

import copy

import pytest
import torch

import deltatune as dt
from tests.models import ZOO

BACKEND = "aot_eager"


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def adapted(name: str, **lora) -> torch.nn.Module:
    model = ZOO[name].build()
    target = ["fc1", "fc2", "head"] if name == "mlp" else None
    dt.attach(model, dt.LoraConfig(target=target, rank=4, **lora))
    with torch.no_grad():  # B starts at zero: make the adapter change the outputs
        for layer in model.modules():
            if isinstance(layer, dt.AdaptedLayer):
                for p in layer.adapters.parameters():
                    p.add_(torch.randn_like(p) * 0.1)
    return model


def train_step(model, zoo_name: str, owner: torch.nn.Module | None = None):
    """Forward and backward through ``model`` (maybe compiled); gradients of ``owner``'s parameters."""
    out = ZOO[zoo_name].run(model)
    loss = out.float().square().mean()
    loss.backward()
    owner = model if owner is None else owner
    grads = {n: p.grad.clone() for n, p in owner.named_parameters() if p.requires_grad}
    return out.detach(), grads


@pytest.mark.parametrize("name", ["mlp", "gpt2", "bert"])
def test_fullgraph_train_step_matches_eager(name):
    eager = adapted(name).train()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, backend=BACKEND)
    torch.manual_seed(0)
    want, want_grads = train_step(eager, name)
    torch.manual_seed(0)
    got, got_grads = train_step(compiled, name, owner=compiled_model)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert want_grads.keys() == got_grads.keys() and want_grads
    for key in want_grads:
        torch.testing.assert_close(got_grads[key], want_grads[key], rtol=1e-4, atol=1e-6)
    # an optimizer step on the compiled model trains the adapter only
    before = {n: p.detach().clone() for n, p in compiled_model.named_parameters()}
    torch.optim.SGD([p for p in compiled_model.parameters() if p.requires_grad], lr=0.1).step()
    changed = {n for n, p in compiled_model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".adapters." in n for n in changed)


@pytest.mark.parametrize("merged", [False, True])
def test_fullgraph_inference_matches_eager(merged):
    model = adapted("llama").eval()
    if merged:
        dt.merge(model)
    with torch.no_grad():
        want = ZOO["llama"].run(model)
        got = ZOO["llama"].run(torch.compile(model, fullgraph=True, backend=BACKEND))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_fullgraph_with_adapter_dropout_trains():
    """Dropout draws its mask inside the captured graph; gradients reach A and B."""
    model = adapted("mlp", dropout=0.2).train()
    compiled = torch.compile(model, fullgraph=True, backend=BACKEND)
    out, grads = train_step(compiled, "mlp", owner=model)
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())


def test_fullgraph_under_bf16_autocast():
    model = adapted("mlp").train()
    compiled = torch.compile(model, fullgraph=True, backend=BACKEND)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ZOO["mlp"].run(compiled)
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32
               for p in model.parameters() if p.requires_grad)


def test_the_fused_kernel_is_what_gets_captured():
    """Each adapted Linear appears in the graph as one autograd function (the fused LoRA node)."""
    model = adapted("mlp").train()
    targets: list[str] = []

    def recording_backend(gm, example_inputs):
        targets.extend(str(node.target) for node in gm.graph.nodes)
        return gm.forward

    out = torch.compile(model, fullgraph=True, backend=recording_backend)(ZOO["mlp"].inputs())
    out.sum().backward()
    assert targets.count("autograd_function_apply") == 3  # fc1, fc2, head


def test_fullgraph_before_the_cpu_engine_is_known(monkeypatch):
    """A first compiled call in a fresh process must not trace the engine's look-up (reading
    /proc/cpuinfo): that broke the graph inside every fused LoRA node."""
    from deltatune.core import products

    monkeypatch.setattr(products, "_AUTO", None)
    model = adapted("bert").train()
    with dt.cpu_engine("auto"):
        out, grads = train_step(torch.compile(model, fullgraph=True, backend=BACKEND), "bert", owner=model)
    assert torch.isfinite(out).all() and grads
