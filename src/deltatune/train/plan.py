"""``deltatune plan``: what each method would cost on this model, data and hardware, before training.

For every applicable method, at its defaults and with each searched field changed in turn
(``space.candidates``), a short probe (``probe.py``) predicts trainable parameters and adapter
bytes (exact), peak training memory, step time, time per epoch and for the whole run. Rows are
marked against a budget (``budget.py``) and ranked: options that fit first, cheapest training
time first. Plan predicts costs, not accuracy (``deltatune tune`` searches for that); each row
says in one line why it sits where it does. The result is ``plan.json`` and ``plan.md``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from deltatune.core.files import write_text_atomic
from deltatune.methods import METHODS
from deltatune.train.budget import Budget, format_bytes, format_seconds, parse_budget
from deltatune.train.config import apply_override
from deltatune.train.space import FULL, candidates, parse_methods

PLAN_FILE = "plan.json"


def base_data(overrides: Sequence[str]) -> dict[str, Any]:
    """The config every candidate shares, from ``--set`` overrides (``method`` is the plan's to set)."""
    data: dict[str, Any] = {}
    for assignment in overrides:
        key = assignment.partition("=")[0].strip()
        if key.split(".")[0] in ("method", "output"):
            raise ValueError(f"--set {key}: the plan sets it for each option; choose methods with --methods")
        apply_override(data, assignment)
    return data


def family_of(method: str) -> str:
    return "full" if method == FULL else getattr(METHODS.get(method), "family", "other")


def _costs(row: dict[str, Any]) -> str:
    return (f"peak memory {row['peak_memory_mb']:.0f} MiB, {format_seconds(row['train_seconds'])} training, "
            f"{format_bytes(row['adapter_bytes'])} to ship, {row['trainable_share']:.3%} of parameters train")


def reasoning(row: dict[str, Any], budget: Budget) -> str:
    """One line: why the row sits where it does."""
    if row["status"] != "ok":
        return row["error"] or row["status"]
    loads = budget.loads(row)
    if row["over"]:
        worst = max(row["over"], key=lambda k: loads[k])
        shown = {"memory": f"{row['peak_memory_mb']:.0f} MiB", "time": format_seconds(row["train_seconds"]),
                 "adapter": format_bytes(row["adapter_bytes"]), "params": f"{row['trainable_parameters']:,}"}
        return (f"over budget: {', '.join(f'{k} {shown[k]} ({loads[k]:.0%} of the limit)' for k in row['over'])}; "
                f"{worst} binds")
    if loads:
        tight = max(loads, key=lambda k: loads[k])
        return (f"fits; tightest is {tight} at {loads[tight]:.0%} of the limit; {format_seconds(row['epoch_seconds'])}"
                f" per epoch, {row['trainable_share']:.3%} of parameters train")
    return (f"{format_seconds(row['epoch_seconds'])} per epoch, {row['peak_memory_mb']:.0f} MiB peak, "
            f"{format_bytes(row['adapter_bytes'])} to ship, {row['trainable_share']:.3%} of parameters train")


def rank_rows(rows: list[dict[str, Any]], budget: Budget) -> list[dict[str, Any]]:
    """Fitting rows by predicted training time, then rows over budget by how far over, then the rest."""
    for row in rows:
        row["family"] = family_of(row["method"])
        if row["status"] == "ok":
            row["loads"] = budget.loads(row)
            row["over"] = budget.over(row)
            row["fits"] = not row["over"]
        else:
            row["loads"], row["over"], row["fits"] = {}, [], None
        row["reason"] = reasoning(row, budget)

    def key(row: dict[str, Any]) -> tuple:
        if row["status"] != "ok":
            return (2, 0.0)
        if row["fits"]:
            return (0, row["train_seconds"])
        return (1, max(row["loads"].values()))
    ranked = sorted(rows, key=key)
    for i, row in enumerate(ranked, 1):
        row["rank"] = i if row["status"] == "ok" else None
    return ranked


def cheapest(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The option nearest to the budget (smallest worst share of a limit), among those that ran."""
    ok = [r for r in rows if r["status"] == "ok"]
    return min(ok, key=lambda r: max(r["loads"].values(), default=0.0)) if ok else None


def no_fit_message(result: dict[str, Any]) -> str | None:
    """``None`` if some option fits (or no budget was given); else what the cheapest option costs."""
    budget_text = result["budget"]["text"]
    rows = result["rows"]
    if not budget_text or any(r.get("fits") for r in rows):
        return None
    best = next((r for r in rows if r["label"] == result.get("cheapest")), None)
    if best is None:
        return f"no option could be probed (see the table); the budget {budget_text} cannot be checked"
    return (f"no option fits the budget {budget_text}; the cheapest is {best['label']}: {_costs(best)} "
            f"(over on {', '.join(best['over'])})")


def run_plan(overrides: Sequence[str] = (), methods: str | Sequence[str] = "all", variants: str = "all",
             budget: str | Budget | None = None, steps: int = 3, output: str | Path | None = None,
             say: Callable[[str], Any] = print) -> dict[str, Any]:
    """Probe every candidate and write ``plan.json`` / ``plan.md`` to ``output`` (if given)."""
    from deltatune.train.probe import Prober

    budget = budget if isinstance(budget, Budget) else parse_budget(budget)
    cands = candidates(parse_methods(methods), variants)
    if output is not None:
        from deltatune.train.output import check_output_for

        check_output_for(Path(output), "plan", (PLAN_FILE, "plan.md"))
    prober = Prober(base_data(overrides), steps=steps, say=say)
    say(f"plan: {len(cands)} options on {prober.config.model} · {prober.config.task}; "
        f"probing each for 1 + {steps} steps")
    rows = []
    for i, cand in enumerate(cands, 1):
        row = prober.probe(cand)
        rows.append(row)
        if row["status"] == "ok":
            say(f"[{i}/{len(cands)}] {cand.label}: {_costs(row)}")
        else:
            say(f"[{i}/{len(cands)}] {cand.label}: {row['status']}: {row['error']}")
    ranked = rank_rows(rows, budget)
    result = {
        "model": prober.config.model, "task": prober.config.task, "overrides": list(overrides),
        "methods": sorted({c.method for c in cands}, key=[c.method for c in cands].index), "variants": variants,
        "budget": budget.to_dict(), **prober.facts(), "rows": ranked, "cheapest": None,
    }
    if budget and not any(r.get("fits") for r in ranked):
        best = cheapest(ranked)
        result["cheapest"] = best["label"] if best else None
    if output is not None:
        out = Path(output)
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / PLAN_FILE, json.dumps(result, indent=2) + "\n")
        write_text_atomic(out / "plan.md", markdown_report(result))
    return result


def markdown_table(result: dict[str, Any]) -> str:
    head = ("| # | option | family | trainable | share | adapter | peak memory | step | epoch | run | fits | why |\n"
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|")
    lines = [head]
    for r in result["rows"]:
        if r["status"] != "ok":
            lines.append(f"| — | {r['label']} | {r['family']} | | | | | | | | {r['status']} | {r['reason']} |")
            continue
        fits = "—" if not result["budget"]["text"] else ("yes" if r["fits"] else "no")
        lines.append(
            f"| {r['rank']} | {r['label']} | {r['family']} | {r['trainable_parameters']:,} | {r['trainable_share']:.3%} "
            f"| {format_bytes(r['adapter_bytes'])} | {r['peak_memory_mb']:.0f} MiB | {r['step_seconds'] * 1000:.0f} ms "
            f"| {format_seconds(r['epoch_seconds'])} | {format_seconds(r['train_seconds'])} | {fits} | {r['reason']} |")
    return "\n".join(lines) + "\n"


def markdown_report(result: dict[str, Any]) -> str:
    budget = result["budget"]["text"] or "none"
    lines = [
        f"# deltatune plan: {result['model']} · {result['task']}", "",
        f"Budget: {budget}. Device {result['device']}, precision {result['precision']}, "
        f"{result['torch_threads']} threads; {result['epochs']} epoch(s) of {result['rows'][0].get('steps_per_epoch', '?')}"
        f" steps (batch {result['batch_size']}). Predictions from 1 + {result['probe_steps']} probe steps per option; "
        f"peak memory is the {result['peak_memory_measure']}. Ranked: options that fit first, by predicted "
        "training time; plan predicts costs, not accuracy (`deltatune tune` searches for that).", "",
        markdown_table(result),
    ]
    message = no_fit_message(result)
    if message:
        lines += ["", f"**{message}**", ""]
    return "\n".join(lines)
