"""Per-segment adapters kept only where validation shows a gain (``deltatune.train.segments``): the rule's
arithmetic against hand-computed figures, its refusals, and the route it gives served through
``deltatune.routing`` (a dropped segment's rows equal the shared model's, a kept one's its adapter's)."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.train.segments import keep_segments, segment_route


def test_gain_is_paired_over_users_with_their_examples_averaged_first():
    # segment a: user u1 two examples (gains 0.2, 0.0 -> 0.1), u2 one (0.3), u3 one (0.2); b: all zero
    shared = [0.5, 0.5, 0.1, 0.2, 0.4, 0.4]
    adapted = [0.7, 0.5, 0.4, 0.4, 0.4, 0.4]
    segments = ["a", "a", "a", "a", "b", "b"]
    users = ["u1", "u1", "u2", "u3", "u4", "u5"]
    d = keep_segments(shared, adapted, segments, users, z=1.0)
    gains = [0.1, 0.3, 0.2]
    assert d["a"]["gain"] == pytest.approx(statistics.fmean(gains))
    assert d["a"]["se"] == pytest.approx(statistics.stdev(gains) / math.sqrt(3))
    assert (d["a"]["users"], d["a"]["examples"]) == (3, 4)
    assert d["a"]["keep"] is True              # 0.2 > 1 * 0.0577
    assert d["b"] == {"keep": False, "gain": 0.0, "se": 0.0, "users": 2, "examples": 2}  # no gain: shared
    assert segment_route(["b", "a", "a", "b"], d) == [None, "a", "a", None]


def test_threshold_in_standard_errors_and_small_segments():
    shared = [0.0] * 4
    adapted = [0.3, -0.1, 0.3, -0.1]          # per-user gains: mean 0.1, se 0.1155
    users = ["p", "q", "r", "s"]
    assert keep_segments(shared, adapted, ["s"] * 4, users, z=0.0)["s"]["keep"] is True   # plain early stopping
    assert keep_segments(shared, adapted, ["s"] * 4, users, z=1.0)["s"]["keep"] is False  # inside one se
    one = keep_segments([0.0], [0.5], ["s"], ["p"], z=0.0)["s"]  # one user cannot show a gain
    assert one["keep"] is False and one["se"] == math.inf
    assert keep_segments([0.1, 0.1], [0.0, 0.0], ["s", "s"], ["p", "q"], z=0.0)["s"]["keep"] is False  # a loss


def test_bad_input_is_refused_naming_the_fix():
    with pytest.raises(ValueError, match="one entry per validation example"):
        keep_segments([0.1, 0.2], [0.1], ["a", "a"], ["u", "v"])
    with pytest.raises(ValueError, match="standard errors >= 0"):
        keep_segments([0.1], [0.2], ["a"], ["u"], z=-1.0)
    with pytest.raises(ValueError, match=r"no decision for segment\(s\) \['c'\]"):
        segment_route(["a", "c"], {"a": {"keep": True}})


def test_route_serves_dropped_segments_with_the_shared_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    x = torch.randn(5, 6, dtype=torch.float64)
    shared = model(x).detach()
    for name in ("young", "old"):
        dt.attach(model, dt.LoraConfig(target=["0", "2"], rank=2), name)
        for p in model.parameters():
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.5)  # a nonzero residual for both segments
    decisions = {"young": {"keep": True}, "old": {"keep": False}}
    rows = ["young", "old", "old", "young", "old"]
    route = segment_route(rows, decisions)
    model.eval()
    with torch.inference_mode(), dt.routing(model, route):
        mixed = model(x)
    with torch.inference_mode(), dt.using(model, "young"):
        young = model(x)
    for i, s in enumerate(rows):
        want = young[i] if s == "young" else shared[i]
        torch.testing.assert_close(mixed[i], want, rtol=0, atol=1e-12)
    assert not torch.allclose(young[0], shared[0])  # the kept adapter does change its rows
