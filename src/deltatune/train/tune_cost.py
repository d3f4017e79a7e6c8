"""What a tune trial will cost, predicted from ``deltatune plan``'s rows before it starts.

The plan measures each method at its defaults and with each searched setting changed on its own;
:func:`predict` composes those rows for a trial's combination of settings, and
:func:`feasible_space` keeps the choices that fit a budget. Used by :mod:`deltatune.train.tune`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from deltatune.train.budget import Budget
from deltatune.train.space import candidate, method_space

COST_KEYS = ("peak_memory_mb", "step_seconds", "trainable_parameters", "adapter_bytes")


def predict(rows: dict[str, dict[str, Any]], method: str, choices: dict[str, str], epochs: int,
            plan_epochs: int) -> dict[str, Any] | None:
    """Predicted costs of ``method`` with ``choices`` from the plan's rows, which hold the method at its
    defaults and with each setting changed on its own (exact for those). For several changes at once:
    memory and step time add each change's difference; parameters and bytes multiply each change's
    ratio (rank x targets compose as products). ``None`` if a row needed failed in the plan."""
    base = rows.get(method)
    if base is None or base["status"] != "ok":
        return None
    out = {k: base[k] for k in (*COST_KEYS, "total_parameters", "steps_per_epoch")}
    first = {k: next(iter(v)) for k, v in method_space(method).items()}
    for key, name in choices.items():
        if name == first.get(key):
            continue
        row = rows.get(candidate(method, {key: name}).label)
        if row is None or row["status"] != "ok":
            return None
        for k in ("peak_memory_mb", "step_seconds"):
            out[k] = max(out[k] + row[k] - base[k], min(out[k], row[k]))
        for k in ("trainable_parameters", "adapter_bytes"):
            out[k] = out[k] * row[k] / base[k] if base[k] else row[k]
    out["trainable_parameters"] = round(out["trainable_parameters"])
    out["trainable_share"] = out["trainable_parameters"] / out["total_parameters"]
    out["epoch_seconds"] = out["step_seconds"] * out["steps_per_epoch"]
    out["train_seconds"] = out["epoch_seconds"] * epochs + base.get("first_step_extra_seconds", 0.0)  # plan's one-off
    return out


def feasible_space(rows: dict[str, dict[str, Any]], methods: Sequence[str], budget: Budget, epochs: int,
                   plan_epochs: int) -> dict[str, dict[str, list[str]]]:
    """``{method: {field: [choice names]}}``: the choices the plan predicts fit (at ``epochs``) on their
    own; a method enters if its defaults or one of its single changes fit."""
    space = {}
    for method in methods:
        default_fits = predict_fits(rows, method, {}, budget, epochs, plan_epochs) is True
        dims, any_fits = {}, default_fits
        for key, choices in method_space(method).items():
            first, *rest = choices
            names = [first] if default_fits else []
            names += [n for n in rest if predict_fits(rows, method, {key: n}, budget, epochs, plan_epochs)]
            any_fits = any_fits or len(names) > (1 if default_fits else 0)
            dims[key] = names or [first]
        if any_fits:
            space[method] = dims
    return space


def predict_fits(rows: dict[str, dict[str, Any]], method: str, choices: dict[str, str], budget: Budget,
                 epochs: int, plan_epochs: int) -> bool | None:
    cost = predict(rows, method, choices, epochs, plan_epochs)
    return None if cost is None else not budget.over(cost)
