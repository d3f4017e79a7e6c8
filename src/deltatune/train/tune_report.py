"""What ``deltatune tune`` writes: ``tune.json`` (every trial), ``tune.md`` (the Pareto front and the
trials), ``pareto.png`` and ``best.yaml`` (the best trial as a recipe ``deltatune train`` runs as is),
all from :func:`summarise`'s dict of the study.

The Pareto front: trials no other trial beats on all three of the validation metric, trainable
parameters and training time (and beats on at least one). All of it is drawn from the result
dict, so the reports can be redrawn from a saved ``tune.json``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import yaml

from deltatune.core.files import write_text_atomic
from deltatune.train.budget import Budget, format_seconds

#: A validation item's cost in training examples, for the compute tune reports: a forward pass without
#: the backward (about twice a forward) or the optimizer step.
FORWARD_SHARE = 1 / 3


def summarise(study: Any, base: dict[str, Any], metric: str, direction: str, budget: Budget, storage: str,
              plan: dict[str, Any]) -> dict[str, Any]:
    """Every trial as a row, the Pareto front and the best trial's recipe settings."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        rows.append({
            "number": t.number, "state": t.state.name, "label": a.get("label"), "value": t.value,
            "params": t.params, "lr": a.get("lr"), "trainable_parameters": a.get("trainable_parameters"),
            "trainable_share": a.get("trainable_share"), "train_seconds": a.get("train_seconds"),
            "train_seconds_spent": a.get("train_seconds_spent", a.get("train_seconds") or 0.0),
            "examples": a.get("examples"), "validation_examples": a.get("validation_examples"),
            "test_metric": a.get("test_metric"), "skipped": a.get("skipped"),
            "duplicate_of": a.get("duplicate_of"), "validations": len(t.intermediate_values), "pid": a.get("pid"),
            "predicted": a.get("predicted"), "recipe": a.get("recipe"),
        })
    complete = [r for r in rows if r["state"] == "COMPLETE" and r["value"] is not None]
    sign = -1 if direction == "maximize" else 1
    best = min(complete, key=lambda r: (sign * r["value"], r["number"])) if complete else None
    return {
        "study": study.study_name, "storage": storage, "metric": metric, "direction": direction,
        "budget": budget.to_dict(), "base": base, "model": plan.get("model"), "task": plan.get("task"),
        "trials": rows, "best": best, "pareto": [r["number"] for r in pareto_front(complete, direction)],
        "compute": compute(rows),
    }


def compute(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """What the study spent: training seconds (validations included), training examples, validation
    items, and both in training examples (a validation item costs ``FORWARD_SHARE`` of one)."""
    own = [r for r in rows if r["duplicate_of"] is None]
    examples = sum(r["examples"] or 0 for r in own)
    validation = sum(r.get("validation_examples") or 0 for r in own)
    return {"train_seconds": round(sum(r["train_seconds_spent"] or 0.0 for r in rows), 2), "examples": examples,
            "validation_examples": validation, "forward_share": round(FORWARD_SHARE, 4),
            "example_equivalents": round(examples + FORWARD_SHARE * validation)}


def _objectives(row: dict[str, Any], direction: str) -> tuple[float, float, float]:
    """All three as 'lower is better'."""
    value = -row["value"] if direction == "maximize" else row["value"]
    return value, float(row["trainable_parameters"] or 0), float(row["train_seconds"] or 0.0)


def pareto_front(rows: list[dict[str, Any]], direction: str) -> list[dict[str, Any]]:
    """The rows no other row dominates (duplicates of another trial's settings left out), best metric first."""
    own = [r for r in rows if r.get("duplicate_of") is None and r.get("value") is not None]
    front = []
    for r in own:
        a = _objectives(r, direction)
        dominated = any(all(x <= y for x, y in zip(_objectives(o, direction), a)) and _objectives(o, direction) != a
                        for o in own if o is not r)
        if not dominated:
            front.append(r)
    return sorted(front, key=lambda r: _objectives(r, direction))


def _num(x: Any, fmt: str) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def table(rows: list[dict[str, Any]], metric: str) -> str:
    lines = [f"| trial | option | lr | validation {metric} | test {metric} | trainable | share | train time | state |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        state = r["state"].lower()
        if r.get("skipped"):
            state = f"not started: {r['skipped']}"
        elif r.get("duplicate_of") is not None:
            state = f"same settings as trial {r['duplicate_of']}"
        elif state == "pruned":
            state = f"pruned after {r['validations']} validation(s)"
        lines.append(f"| {r['number']} | {r['label'] or '—'} | {_num(r['lr'], '.3g')} | {_num(r['value'], '.4f')} "
                     f"| {_num(r['test_metric'], '.4f')} | {_num(r['trainable_parameters'], ',')} "
                     f"| {_num(r['trainable_share'], '.3%')} | {format_seconds(r['train_seconds'])} | {state} |")
    return "\n".join(lines) + "\n"


def markdown_report(result: dict[str, Any]) -> str:
    by_number = {r["number"]: r for r in result["trials"]}
    best = result["best"]
    states = [r["state"] for r in result["trials"]]
    lines = [
        f"# deltatune tune: {result['model']} · {result['task']}", "",
        f"Study `{result['study']}` in `{result['storage']}`; {len(states)} trials: {states.count('COMPLETE')} complete, "
        f"{states.count('PRUNED')} pruned or not started, {states.count('FAIL')} failed. Budget: "
        f"{result['budget']['text'] or 'none'}. Compute spent: {format_seconds(result['compute']['train_seconds'])} "
        f"of training, {result['compute']['examples']:,.0f} training examples and "
        f"{result['compute']['validation_examples']:,.0f} validation items.", "",
    ]
    if best:
        lines += [f"Best: trial {best['number']}, {best['label']}, lr {best['lr']:.3g}: validation {result['metric']} "
                  f"{best['value']:.4f} (test {_num(best['test_metric'], '.4f')}); recipe in `best.yaml` "
                  "(`deltatune train best.yaml`).", ""]
    lines += ["## Pareto front (validation metric, trainable parameters, training time)", "",
              table([by_number[n] for n in result["pareto"]], result["metric"]), "", "## All trials", "",
              table(result["trials"], result["metric"])]
    return "\n".join(lines)


def recipe_yaml(result: dict[str, Any]) -> str | None:
    best = result["best"]
    if not best or not best.get("recipe"):
        return None
    header = (f"# deltatune tune's best trial ({best['number']} of study {result['study']}): {best['label']}, "
              f"validation {result['metric']} {best['value']:.4f}.\n# Run it as is: deltatune train best.yaml\n")
    return header + yaml.safe_dump(best["recipe"], sort_keys=False)


def plot_pareto(result: dict[str, Any], path: Path) -> None:
    """Validation metric against trainable parameters and against training time; the front joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in result["trials"] if r["state"] == "COMPLETE" and r["value"] is not None
            and r.get("duplicate_of") is None]
    front = {n for n in result["pareto"]}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True, constrained_layout=True)
    for ax, key, label, log in ((axes[0], "trainable_parameters", "trainable parameters (log)", True),
                                (axes[1], "train_seconds", "training time (s)", False)):
        xs = [r[key] for r in done]
        ax.scatter(xs, [r["value"] for r in done], c=["tab:red" if r["number"] in front else "tab:gray" for r in done],
                   s=28, zorder=3)
        for r in done:
            if r["number"] in front:
                ax.annotate(r["label"], (r[key], r["value"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set(xlabel=label, xscale="log" if log else "linear")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"validation {result['metric']}")
    fig.suptitle(f"deltatune tune · {result['model']} · {result['task']} (red: Pareto front)")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_reports(result: dict[str, Any], output: Path) -> None:
    write_text_atomic(output / "tune.json", json.dumps(result, indent=2, default=str) + "\n")
    write_text_atomic(output / "tune.md", markdown_report(result))
    recipe = recipe_yaml(result)
    if recipe:
        write_text_atomic(output / "best.yaml", recipe)
    plot_pareto(result, output / "pareto.png")
