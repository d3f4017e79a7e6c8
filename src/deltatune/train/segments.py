"""Per-segment adapters, kept only where validation shows a gain: the rule and the route.

A segment adapter (one per user segment: an age band, a region) trains as a residual on top of a
shared model, starting at zero, and stops early on the segment's own validation examples. Early
stopping keeps the epoch with the best validation score, the largest of several noisy estimates,
so a small validation gain is often only noise (the winner's curse), and a segment with few
validation users is served a worse model than the shared one. :func:`keep_segments` keeps a
segment's adapter only when its validation gain over the shared model, paired over the segment's
users, is more than ``z`` standard errors: with ``z=1`` the one-standard-error rule, which prefers
the simpler model (the shared one alone) unless the evidence is clear. :func:`segment_route` then
names, per example, its segment's adapter or ``None`` (the shared model) for ``deltatune.routing``::

    decisions = keep_segments(shared_scores, segment_scores, val_segments, val_users, z=1.0)
    with deltatune.routing(model, segment_route(test_segments, decisions)):
        ...

Decide on validation only; a test set read to set ``z`` or the segments is no longer a test set.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Hashable, Mapping, Sequence
from typing import Any


def keep_segments(shared: Sequence[float], adapted: Sequence[float], segments: Sequence[str],
                  users: Sequence[Hashable], z: float = 1.0) -> dict[str, dict[str, Any]]:
    """Per segment, whether to keep its adapter: ``shared[i]`` and ``adapted[i]`` are validation example
    ``i``'s scores (higher is better, e.g. NDCG@10) without and with the segment's adapter, ``segments[i]``
    its segment, ``users[i]`` whose example it is (a user's examples are averaged first: they are not
    independent). Returns ``{segment: {"keep", "gain", "se", "users", "examples"}}``: the mean per-user
    gain, its standard error, and ``keep`` when the gain is positive and above ``z`` standard errors. A
    segment with fewer than two validation users cannot show that and is not kept."""
    n = len(shared)
    if not (len(adapted) == len(segments) == len(users) == n):
        raise ValueError(f"keep_segments: shared, adapted, segments and users must be one entry per validation "
                         f"example; got lengths {n}, {len(adapted)}, {len(segments)}, {len(users)}")
    if not math.isfinite(z) or z < 0:
        raise ValueError(f"keep_segments: z={z!r}; pass a number of standard errors >= 0 (1: the one-standard-error rule)")
    per_user: dict[str, dict[Hashable, list[float]]] = {}
    for a, b, s, u in zip(shared, adapted, segments, users):
        per_user.setdefault(s, {}).setdefault(u, []).append(float(b) - float(a))
    out: dict[str, dict[str, Any]] = {}
    for s in sorted(per_user):
        gains = [statistics.fmean(v) for v in per_user[s].values()]
        mean = statistics.fmean(gains)
        se = statistics.stdev(gains) / math.sqrt(len(gains)) if len(gains) > 1 else math.inf
        out[s] = {"keep": len(gains) > 1 and mean > 0 and mean > z * se, "gain": mean, "se": se,
                  "users": len(gains), "examples": sum(len(v) for v in per_user[s].values())}
    return out


def segment_route(segments: Sequence[str], decisions: Mapping[str, Mapping[str, Any]]) -> list[str | None]:
    """Per example, its segment's adapter name (the segment's name) where ``decisions`` keeps it, else
    ``None`` (the shared model): the ``adapter_names`` of ``deltatune.routing``."""
    missing = sorted(set(segments) - set(decisions))
    if missing:
        raise ValueError(f"segment_route: no decision for segment(s) {missing}; decide each on its validation "
                         "examples with keep_segments (a segment without validation users: route it to None)")
    return [s if decisions[s]["keep"] else None for s in segments]
