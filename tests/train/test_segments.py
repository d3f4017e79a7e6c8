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


def test_genre_shares_split_an_item_over_its_genres() -> None:
    from deltatune.train.segments import genre_shares

    genres = {"a": ["Drama"], "b": ["Action", "Drama"], "c": ["Comedy", "Action", "Drama", "War"]}
    shares = genre_shares(["a", "b", "c", "unknown"], genres, ["Action", "Comedy", "Drama", "War"])
    assert shares == pytest.approx([0.75 / 3, 0.25 / 3, 1.75 / 3, 0.25 / 3])  # a: 1 drama; b: 1/2 + 1/2; c: 1/4 each
    assert genre_shares(["unknown"], genres, ["Drama"]) is None and genre_shares([], genres, ["Drama"]) is None


def test_taste_segments_find_the_tastes_and_route_new_histories() -> None:
    """Two tastes, built so that genre shares separate them (and nothing else does): users who watch mostly
    action films and users who watch mostly dramas, each with a little of the other. The clusters must be
    those two groups, named after their genre, and a new user's history routes by what it holds."""
    from deltatune.train.segments import taste_segments

    genres = {f"act{i}": ["Action"] for i in range(5)} | {f"dra{i}": ["Drama"] for i in range(5)} | \
        {"both": ["Action", "Drama"], "docu": ["Documentary"]}
    action = [[f"act{i % 5}", f"act{(i + 1) % 5}", f"act{(i + 2) % 5}", "dra0"] for i in range(6)]
    drama = [[f"dra{i % 5}", f"dra{(i + 1) % 5}", "both", "docu"] for i in range(8)]
    taste = taste_segments(action + drama + [["nothing known"]], genres, k=2)
    assert taste.names == ("taste_action", "taste_drama") and taste.genres == ("Action", "Documentary", "Drama")
    assert [taste.route(h) for h in action] == ["taste_action"] * 6
    assert [taste.route(h) for h in drama] == ["taste_drama"] * 8
    assert taste.route(["act3", "both", "dra1", "act0"]) == "taste_action"    # 2.5 of 4 action: closer to the action centre
    assert taste.route(["dra3", "docu"]) == "taste_drama"
    assert taste.route(["nothing known"]) is None and taste.route([]) is None  # served by the shared model
    centre = dict(zip(taste.names, taste.centroids))["taste_action"]
    assert centre == pytest.approx([0.75, 0.0, 0.25])  # every action user: 3 action films, 1 drama
    assert dict(zip(taste.names, taste.centroids))["taste_drama"] == pytest.approx([0.125, 0.25, 0.625])
    assert taste_segments(action + drama, genres, k=2, seed=1).names == taste.names


def test_taste_segments_refuse_bad_input_naming_the_fix() -> None:
    from deltatune.train.segments import taste_segments

    genres = {"a": ["Action"], "d": ["Drama"]}
    with pytest.raises(ValueError, match="number of segments >= 2"):
        taste_segments([["a"], ["d"]], genres, k=1)
    with pytest.raises(ValueError, match="2 histories with a known genre for k=3"):
        taste_segments([["a"], ["d"], ["x"]], genres, k=3)
    with pytest.raises(ValueError, match="names no genre"):
        taste_segments([["a"]], {"a": []}, k=2)
