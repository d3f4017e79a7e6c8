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

Segments need not be demographic. :func:`taste_segments` clusters users by what they watched (k-means
over the genre shares of their histories, fitted on data from before the adaptation period) and routes
any history, a new user's included, to its nearest cluster at prediction time::

    taste = taste_segments(past_histories, item_genres, k=2)
    test_segments = [taste.route(history) for history in histories_before_the_held_out_items]
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
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


def genre_shares(history: Iterable[str], item_genres: Mapping[str, Sequence[str]],
                 genres: Sequence[str]) -> list[float] | None:
    """The share of each of ``genres`` in ``history`` (item names): each item counts once, split evenly over its
    genres (``item_genres[item]``), so the shares sum to 1. ``None`` when no item of the history has a genre."""
    column = {g: i for i, g in enumerate(genres)}
    counts = [0.0] * len(genres)
    for item in history:
        mine = [g for g in item_genres.get(item, ()) if g in column]
        for g in mine:
            counts[column[g]] += 1.0 / len(mine)
    total = sum(counts)
    return [c / total for c in counts] if total > 0 else None


@dataclass(frozen=True)
class TasteSegments:
    """Users segmented by taste: ``centroids[j]`` (genre shares, one per ``genres``) is segment ``names[j]``'s
    centre; :meth:`route` sends a history to the nearest one (squared Euclidean distance, first on a tie)."""

    genres: tuple[str, ...]
    names: tuple[str, ...]
    centroids: tuple[tuple[float, ...], ...]
    item_genres: Mapping[str, Sequence[str]] = field(repr=False, compare=False)

    def route(self, history: Iterable[str]) -> str | None:
        """The segment of a user with this history (item names, any length, any period); ``None`` (the shared
        model) when no item of it has a known genre, e.g. a new user's first visit."""
        x = genre_shares(history, self.item_genres, self.genres)
        if x is None:
            return None
        distance = [sum((a - b) ** 2 for a, b in zip(x, c)) for c in self.centroids]
        return self.names[distance.index(min(distance))]


def taste_segments(histories: Iterable[Iterable[str]], item_genres: Mapping[str, Sequence[str]], k: int,
                   seed: int = 0) -> TasteSegments:
    """``k`` taste segments from users' ``histories`` (item names; fit on data from before the period the
    segment adapters train on, so routing a held-out user reads nothing of what they are tested on): k-means
    (scikit-learn, 10 starts from ``seed``) over each history's genre shares (:func:`genre_shares`; a history
    without a known genre is skipped). The shares are not standardised, so the clusters split along the genres
    that vary most between users (on MovieLens-100K: drama and romance against action, comedy, thriller), not
    along rare ones. Each segment is named ``taste_<genre>`` after the genre its centre holds most above the
    mean of all histories (``_2``, ``_3`` added on a clash); segments are in name order."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise ValueError(f"taste_segments: k={k!r}; pass a number of segments >= 2")
    genres = tuple(sorted({g for v in item_genres.values() for g in v}))
    if not genres:
        raise ValueError("taste_segments: item_genres names no genre; pass item -> list of genres "
                         "(MovieLens: read_items(movielens_100k('item'), 'class'), split on spaces)")
    profiles = [x for x in (genre_shares(h, item_genres, genres) for h in histories) if x is not None]
    if len(profiles) < k:
        raise ValueError(f"taste_segments: {len(profiles)} histories with a known genre for k={k} segments; "
                         "pass more histories or a smaller k")
    try:
        from sklearn.cluster import KMeans
    except ImportError as e:
        raise ImportError("taste segments cluster with scikit-learn's k-means: pip install 'deltatune[segments]'") from e
    fit = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(profiles)
    centres = [tuple(float(v) for v in c) for c in fit.cluster_centers_]
    mean = [statistics.fmean(col) for col in zip(*profiles)]
    bases, names = [], []
    for c in centres:
        lift = [a - b for a, b in zip(c, mean)]
        base = "taste_" + re.sub(r"[^a-z0-9]", "", genres[lift.index(max(lift))].lower())
        names.append(base if base not in bases else f"{base}_{bases.count(base) + 1}")
        bases.append(base)
    order = sorted(range(k), key=lambda j: names[j])
    return TasteSegments(genres, tuple(names[j] for j in order), tuple(centres[j] for j in order), item_genres)
