"""Weighted combination of low-rank adapters into a new adapter.

Follows Hugging Face PEFT's ``add_weighted_adapter`` so that results carry over. With ``w_i`` the
user's weights, ``s_i`` the sources' scalings and ``(A_i, B_i)`` their factors on one layer
(``ΔW_i = s_i B_i A_i``), the new adapter has scaling 1 and

- ``cat``: ``A = [w_1 s_1 A_1; …]``, ``B = [B_1, …]``, so ``ΔW = Σ w_i ΔW_i`` exactly (rank Σ r_i);
- ``svd`` (any ranks): ``ΔW = Σ w_i ΔW_i`` truncated to ``rank`` by SVD: ``B = U_k S_k``,
  ``A = V_kᵀ`` (optionally clamped to the ``svd_clamp`` quantile of their entries);
- ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: the merge rule is
  applied to the A factors and to the B factors separately, with weights ``±√|w_i s_i|`` on A
  (carrying the sign) and ``√|w_i s_i|`` on B. This is cheap but approximate: the cross terms
  ``B_i A_j`` enter ``ΔW``. PEFT requires equal ranks here; smaller ranks are zero-padded;
- ``<rule>_svd`` (``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd``):
  the merge rule on the full ``ΔW_i``, then SVD as for ``svd``.

The merge rules, on task tensors ``τ_i`` (stacked along a new first dimension):

- linear (task arithmetic, Ilharco et al. 2023): ``Σ w_i τ_i``;
- magnitude_prune: keep the ``⌊density · numel⌋`` largest ``|τ_i|`` of each tensor, then linear;
- ties (TIES-merging, Yadav et al. 2023, arXiv:2306.01708): trim as magnitude_prune; elect the
  sign ``γ = sign(Σ_i τ̂_i)`` (``total``) or ``sign(Σ_i sign τ̂_i)`` (``frequency``), ties to +;
  disjoint merge ``Σ_i w_i τ̂_i [sign τ̂_i = γ] / max(1, Σ_i [sign τ̂_i = γ])``;
- dare_linear / dare_ties (DARE, Yu et al. 2023, arXiv:2311.03099): drop each entry with
  probability ``1 − density`` and rescale the kept ones by ``1 / density``, then linear / the
  ties sign election and disjoint merge. Random masks are drawn from ``generator``, one tensor
  at a time in source order (A factors first, then B factors).

Modules trained in full (``modules_to_save``, e.g. a classifier head) cannot be combined: the new
adapter copies them from one source, named by ``heads_from``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from deltatune.core.inject import attach, detach
from deltatune.core.records import adapted_layers, configs, known
from deltatune.core.report import AttachReport
from deltatune.core.layer import FullCopy
from deltatune.core.contract import LowRankConfig, is_low_rank

RULES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
HOWS = ("cat", "svd", *RULES, *(f"{r}_svd" for r in RULES if r != "linear"))
_DENSITY = {"ties", "dare_linear", "dare_ties", "magnitude_prune"}

# --- merge rules on lists of same-shape tensors ---------------------------------------------------


def prune_magnitude(t: Tensor, density: float) -> Tensor:
    """Keep the ``⌊density · numel⌋`` entries of largest magnitude, zero the rest."""
    if density >= 1:
        return t
    keep = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
    keep[t.abs().flatten().topk(int(density * t.numel())).indices] = 1
    return t * keep.view(t.shape)


def prune_random(t: Tensor, density: float, generator: torch.Generator | None = None) -> Tensor:
    """DARE: keep each entry with probability ``density`` and rescale it by ``1 / density``."""
    if density >= 1:
        return t
    keep = torch.bernoulli(torch.full_like(t, density), generator=generator)
    return t * keep / density


def elect_sign(tensors: Tensor, method: str = "total") -> Tensor:
    """Mask of entries agreeing with the elected sign; ``tensors`` is (n, ...)."""
    votes = tensors.sum(0) if method == "total" else tensors.sign().sum(0)
    majority = torch.where(votes >= 0, 1.0, -1.0).to(tensors.dtype)
    return tensors.sign() == majority


def merge_tensors(rule: str, tensors: Sequence[Tensor], weights: Tensor, density: float = 1.0,
                  majority_sign: str = "total", generator: torch.Generator | None = None) -> Tensor:
    """Apply merge ``rule`` to task tensors ``tensors`` with ``weights`` (n,): see the module docs."""
    if rule in ("ties", "magnitude_prune"):
        tensors = [prune_magnitude(t, density) for t in tensors]
    elif rule in ("dare_linear", "dare_ties"):
        tensors = [prune_random(t, density, generator) for t in tensors]
    stacked = torch.stack(list(tensors))                              # (n, ...)
    weighted = stacked * weights.view(-1, *([1] * (stacked.dim() - 1))).to(stacked)
    if rule in ("ties", "dare_ties"):
        agree = elect_sign(stacked, majority_sign)
        return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)
    return weighted.sum(0)


# --- combining adapters -----------------------------------------------------------------------


@dataclasses.dataclass
class _Options:
    how: str
    density: float
    majority_sign: str
    rank: int | None
    svd_clamp: float | None
    generator: torch.Generator | None


def _pad(t: Tensor, rank: int, dim: int) -> Tensor:
    missing = rank - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def _combine_layer(sources: list[tuple[float, Tensor, Tensor, float]], o: _Options, rank: int) -> tuple[Tensor, Tensor]:
    """New ``(A, B)`` (scaling 1) from ``(w, A, B, s)`` per source adapting this layer."""
    if o.how == "cat":
        return (torch.cat([w * s * A for w, A, _, s in sources]), torch.cat([B for _, _, B, _ in sources], dim=1))
    if o.how in RULES:
        r = max(A.shape[0] for _, A, _, _ in sources)
        ws = torch.tensor([w * s for w, _, _, s in sources], dtype=torch.float64)
        wA, wB = ws.sign() * ws.abs().sqrt(), ws.abs().sqrt()
        kw = dict(density=o.density, majority_sign=o.majority_sign, generator=o.generator)
        A = merge_tensors(o.how, [_pad(A, r, 0) for _, A, _, _ in sources], wA, **kw)
        B = merge_tensors(o.how, [_pad(B, r, 1) for _, _, B, _ in sources], wB, **kw)
        return A, B
    rule = "linear" if o.how == "svd" else o.how.removesuffix("_svd")
    deltas = [s * B @ A for _, A, B, s in sources]                    # each (d_out, d_in)
    weights = torch.tensor([w for w, _, _, _ in sources], dtype=torch.float64)
    delta = merge_tensors(rule, deltas, weights, o.density, o.majority_sign, o.generator)
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    B, A = U[:, :rank] * S[:rank], Vh[:rank]                          # (d_out, k), (k, d_in)
    if o.svd_clamp is not None:
        high = torch.quantile(torch.cat([B.flatten(), A.flatten()]), o.svd_clamp)
        B, A = B.clamp(-high, high), A.clamp(-high, high)
    return A, B


def _check(model: nn.Module, adapters: Sequence[str], weights: Sequence[float], name: str,
           o: _Options, heads_from: str | None) -> None:
    if not adapters or len(set(adapters)) != len(adapters):
        raise ValueError(f"combine needs one or more distinct adapter names, got {list(adapters)}")
    for a in adapters:
        known(model, a)
    if name in configs(model):
        raise ValueError(f"an adapter named {name!r} is already attached; choose another name for the combination")
    if len(weights) != len(adapters):
        raise ValueError(f"got {len(weights)} weights for {len(adapters)} adapters; give one weight per adapter")
    if o.how not in HOWS:
        raise ValueError(f"how must be one of {', '.join(HOWS)}; got {o.how!r}")
    uses_density = o.how.removesuffix("_svd") in _DENSITY
    if uses_density and not 0 < o.density <= 1:
        raise ValueError(f"{o.how} needs a density in (0, 1], the fraction of entries kept; got {o.density}")
    if o.majority_sign not in ("total", "frequency"):
        raise ValueError(f"majority_sign must be 'total' or 'frequency'; got {o.majority_sign!r}")
    if not o.how.endswith("svd") and (o.rank is not None or o.svd_clamp is not None):
        raise ValueError(f"rank and svd_clamp apply to the svd combinations only, not to {o.how!r}")
    if o.rank is not None and o.rank < 1:
        raise ValueError(f"rank must be >= 1, got {o.rank}")
    if o.svd_clamp is not None and not 0 < o.svd_clamp <= 1:
        raise ValueError(f"svd_clamp is a quantile in (0, 1]; got {o.svd_clamp}")
    if not isinstance(configs(model)[adapters[0]], LowRankConfig):
        raise ValueError(f"adapter {adapters[0]!r} ({configs(model)[adapters[0]].method}) is not a low-rank "
                         "method; combine works on adapters with low-rank factors (low_rank_factors)")
    has_heads = False
    for layer_name, layer in adapted_layers(model):
        for a in adapters:
            adapter = layer.adapters[a] if a in layer.adapters else None
            has_heads |= isinstance(adapter, FullCopy)
            if adapter is not None and not (is_low_rank(adapter) or isinstance(adapter, FullCopy)):
                raise ValueError(f"adapter {a!r} on {layer_name!r} ({type(adapter).__name__}) is not low-rank; "
                                 "combine works on adapters with low-rank factors on linear layers")
            if a in layer.merged:
                raise ValueError(f"adapter {a!r} is merged into {layer_name!r}; unmerge(model) before combining")
    if heads_from is not None and heads_from not in adapters:
        raise ValueError(f"heads_from={heads_from!r} must be one of the combined adapters {list(adapters)}")
    if has_heads and heads_from is None:
        raise ValueError("the adapters train modules in full (modules_to_save), which cannot be combined; "
                         "pass heads_from=<one of them> to copy that adapter's modules")


@torch.no_grad()
def combine(model: nn.Module, adapters: Sequence[str], weights: Sequence[float], name: str, *, how: str,
            density: float = 1.0, majority_sign: str = "total", rank: int | None = None,
            svd_clamp: float | None = None, heads_from: str | None = None,
            generator: torch.Generator | None = None) -> AttachReport:
    """Attach a new adapter ``name`` combining ``adapters`` with ``weights`` as ``how`` says.

    The new adapter is a plain low-rank adapter (scaling 1) on the union of the sources' target
    modules, not active. ``density`` is for the pruning rules, ``majority_sign`` for the ties
    rules, ``rank`` (default: the largest source rank) and ``svd_clamp`` for the svd ones.
    """
    o = _Options(how, density, majority_sign, rank, svd_clamp, generator)
    _check(model, adapters, weights, name, o, heads_from)
    gathered: dict[str, list[tuple[float, Tensor, Tensor, float]]] = {}
    heads: dict[str, dict[str, Tensor]] = {}
    for layer_name, layer in adapted_layers(model):
        if heads_from in layer.adapters and isinstance(layer.adapters[heads_from], FullCopy):
            heads[layer_name] = layer.adapters[heads_from].state_dict()
        for a, w in zip(adapters, weights):
            if a in layer.adapters and is_low_rank(layer.adapters[a]):
                A, B, s = layer.adapters[a].low_rank_factors()
                dtype = torch.promote_types(A.dtype, torch.float32)  # combine in at least float32
                gathered.setdefault(layer_name, []).append((float(w), A.to(dtype), B.to(dtype), float(s)))
    if not gathered:
        raise ValueError(f"adapters {list(adapters)} hold no low-rank layers to combine")
    svd_rank = o.rank or max(A.shape[0] for sources in gathered.values() for _, A, _, _ in sources)
    plans = {layer_name: _combine_layer(sources, o, svd_rank) for layer_name, sources in gathered.items()}
    new_rank = svd_rank if o.how.endswith("svd") else max(A.shape[0] for A, _ in plans.values())
    home = configs(model)[adapters[0]]
    assert isinstance(home, LowRankConfig)  # checked in _check
    config = home.low_rank_config(new_rank)
    config = dataclasses.replace(config, target=tuple(plans), exclude=(), layers=None, modules_to_save=tuple(heads))
    report = attach(model, config, name, activate=False, module_names=list(plans), save_names=list(heads))
    try:
        for layer_name, layer in adapted_layers(model):
            adapter = layer.adapters[name] if name in layer.adapters else None
            if layer_name in plans:
                if adapter is None or not is_low_rank(adapter):
                    raise ValueError(f"{config.method} built a {type(adapter).__name__} on {layer_name!r}, not a "
                                     "low-rank adapter; this layer type cannot hold a combination")
                adapter.load_low_rank(*plans[layer_name], 1.0)
            elif layer_name in heads:
                adapter.load_state_dict(heads[layer_name])  # type: ignore[union-attr]
    except Exception:
        detach(model, name)
        raise
    return report
