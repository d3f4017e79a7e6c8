"""What ``deltatune compare`` writes: ``compare.json``, ``compare.md`` (the table) and ``compare.png``.

Everything here reads the result dict that :func:`deltatune.train.compare.run_comparison` builds
(one row per method, already in table order: full fine-tuning, then by family), so the reports can
be redrawn from a saved ``compare.json``.
"""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path
from typing import Any

FULL = "full"  # the reference row
FAMILY_COLORS = {"full": "tab:gray", "addition": "tab:blue", "specification": "tab:orange",
                 "reparameterization": "tab:green", "hybrid": "tab:purple", "other": "tab:brown"}


def _clean(value: Any) -> Any:
    """NaN -> None all the way down, so any JSON reader accepts the file."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def write_reports(result: dict[str, Any], output: Path) -> None:
    (output / "compare.json").write_text(json.dumps(_clean(result), indent=2) + "\n")
    (output / "compare.md").write_text(markdown_report(result))
    plot_comparison(result, output / "compare.png")


def _size(n: int | None) -> str:
    if n is None:
        return "—"
    for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _num(x: float | None, fmt: str) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def one_line(row: dict[str, Any]) -> str:
    if row["status"] != "ok":
        return f"error: {row['error']}"
    if row.get("scores"):  # a task's own quality columns
        quality = ", ".join(f"{k} {_num(v, '.4f')}" for k, v in row["scores"].items())
        return (f"{quality}, {row['trainable_parameters']:,} trainable, {_size(row['adapter_bytes'])}, "
                f"{row['train_seconds']:.0f} s, peak {row['peak_memory_mb']:.0f} MiB")
    return (f"accuracy {_num(row['accuracy'], '.4f')}, macro-F1 {_num(row['macro_f1'], '.4f')}, "
            f"{row['trainable_parameters']:,} trainable, {_size(row['adapter_bytes'])}, "
            f"{row['train_seconds']:.0f} s, peak {row['peak_memory_mb']:.0f} MiB")


def quality_columns(result: dict[str, Any]) -> list[tuple[str, str]]:
    """(metric key, column label): the task's own (e.g. HR@10, NDCG@10), else accuracy and macro-F1."""
    return [tuple(c) for c in result.get("columns") or ()] or [("accuracy", "accuracy"), ("macro_f1", "macro-F1")]


def score(row: dict[str, Any], key: str) -> float | None:
    return (row.get("scores") or {}).get(key) if row.get("scores") else row.get(key)


def markdown_table(result: dict[str, Any]) -> str:
    """The table: one row per method, full fine-tuning first, then by family."""
    rows = result["rows"]
    full = next((r for r in rows if r["method"] == FULL and r["status"] == "ok"), None)
    notes = any(r["status"] != "ok" for r in rows)
    columns = quality_columns(result)
    head = ["method", "family", *[label for _, label in columns], "trainable params", "trainable %",
            "adapter size", "train time", "peak memory", "lr"] + (["note"] if notes else [])
    align = [":--", ":--"] + ["--:"] * (6 + len(columns)) + ([":--"] if notes else [])  # text left, numbers right
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
    for r in rows:
        if r["status"] != "ok":
            error = " ".join(str(r["error"]).split()).replace("|", "\\|")
            cells = [r.get("option") or r["method"], r["family"], *["—"] * (5 + len(columns)), _num(r["lr"], "g"),
                     f"error: {error[:200]}{'…' if len(error) > 200 else ''}"]
        else:
            ratio = f" ({r['train_seconds'] / full['train_seconds']:.2f}×)" if full and full["train_seconds"] else ""
            cells = [r.get("option") or r["method"], r["family"], *[_num(score(r, key), ".4f") for key, _ in columns],
                     f"{r['trainable_parameters']:,}", _num(r["trainable_share"] and 100 * r["trainable_share"], ".3f") + "%",
                     _size(r["adapter_bytes"]), f"{r['train_seconds']:.1f} s{ratio}",
                     f"{r['peak_memory_mb']:,.0f} MiB", _num(r["lr"], "g")] + ([""] if notes else [])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown_report(result: dict[str, Any]) -> str:
    s, sp = result["shared"], result["splits"]
    base = result.get("majority_baseline") or {}
    memory = result.get("peak_memory_measure") or "peak memory"
    ok = [r["metrics"] for r in result["rows"] if r["status"] == "ok"]
    loads = [m["load_average"][0] for m in ok if m.get("load_average")]
    load = f" (1-minute load average {min(loads):.1f}–{max(loads):.1f} on {ok[0]['cpu_count']} CPUs)" if loads else ""
    where = "each method in its own process" if result["isolated"] else "all methods in one process, so not per method"
    lines = [
        f"# Method comparison: {result['task']} on {result['model']}",
        "",
        f"Every method trains on the same split (train {sp['train']:,} / validation {sp['validation']:,} / "
        f"test {sp['test']:,} examples, seed {s['seed']}) for {s['epochs']} epoch(s), batch size {s['batch_size']}, "
        f"max length {s['max_length']}, precision {result.get('precision') or s['precision']}, "
        f"device {result.get('device') or s['device']}.",
    ]
    if result.get("baseline_note"):
        lines.append(result["baseline_note"])
    if base.get("accuracy") is not None:
        lines.append(f"Majority class on the test split: accuracy {base['accuracy']:.4f}, "
                     f"macro-F1 {_num(base['macro_f1'], '.4f')}.")
    lines += ["", markdown_table(result),
              f"{' and '.join(label for _, label in quality_columns(result))} on the test split. Trainable % is of all parameters of the adapted model. "
              "Adapter size is the saved adapter (for full fine-tuning, the whole model). Train time is the "
              "training steps plus validation, wall clock (× relative to full fine-tuning; timings are noisy on a "
              f"shared machine{load}). Peak memory: {memory}, {where}. Learning rates are per-method defaults "
              "(each method config's `suggested_lr`) unless overridden; every run's full config is in "
              "compare.json.", "", f"Reproduce: `{reproduce(result)}`", ""]
    return "\n".join(lines)


def reproduce(result: dict[str, Any]) -> str:
    """The command line that reruns this comparison (add ``--output DIR``)."""
    args = ["deltatune", "compare", "--methods", ",".join(result["methods"])]
    args += [a for o in result["overrides"] for a in ("--set", o)]
    args += [a for o in result["method_overrides"] for a in ("--set-method", o)]
    return " ".join(shlex.quote(a) for a in args) + ("" if result["isolated"] else " --in-process")


def plot_comparison(result: dict[str, Any], path: Path) -> None:
    """Three panels per method: test accuracy and macro-F1, trainable share, adapter size."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from matplotlib.ticker import NullFormatter

    rows = result["rows"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 1.6 + 0.42 * len(rows)), sharey=True, constrained_layout=True)
    ok = [(i, r) for i, r in enumerate(rows) if r["status"] == "ok"]
    colors = [FAMILY_COLORS[r["family"]] for _, r in ok]
    ys = [i for i, _ in ok]
    acc = axes[0]
    (k1, l1), (k2, l2) = (quality_columns(result) * 2)[:2]
    acc.barh([y - 0.2 for y in ys], [score(r, k1) or 0 for _, r in ok], height=0.4, color=colors, label=l1)
    acc.barh([y + 0.2 for y in ys], [score(r, k2) or 0 for _, r in ok], height=0.4, color=colors, alpha=0.45,
            label=l2)
    base = (result.get("majority_baseline") or {}).get("accuracy")
    if base is not None:
        acc.axvline(base, color="black", linestyle="--", linewidth=1, label="majority-class accuracy")
    acc.set(xlabel=f"test score (solid: {l1}, light: {l2})", xlim=(0, 1), title="quality")
    shares = [100 * r["trainable_share"] for _, r in ok]
    axes[1].barh(ys, shares, color=colors)
    axes[1].set(xscale="log", xlabel="trainable parameters (% of all, log)", title="trainable share")
    axes[2].barh(ys, [r["adapter_bytes"] / 2**20 for _, r in ok], color=colors)
    axes[2].set(xscale="log", xlabel="saved size (MiB, log)", title="adapter size")
    for y, share, (_, r) in zip(ys, shares, ok):
        right = max(score(r, k1) or 0, score(r, k2) or 0) + 0.01
        acc.text(right, y, _num(score(r, k1), ".3f"), va="center", fontsize=8)
        axes[1].text(share, y, f" {share:.3g}%", va="center", fontsize=8)
        axes[2].text(r["adapter_bytes"] / 2**20, y, f" {_size(r['adapter_bytes'])}", va="center", fontsize=8)
    for ax in axes[1:]:
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.margins(x=0.25)  # room for the labels at the bar ends
    for i, r in enumerate(rows):
        if r["status"] != "ok":
            acc.text(0.01, i, "error (see compare.md)", va="center", color="tab:red", fontsize=8)
    acc.set_yticks(range(len(rows)), [r.get("option") or r["method"] for r in rows])
    acc.set_ylim(len(rows) - 0.5, -0.5)  # table order, top to bottom
    families = list(dict.fromkeys(r["family"] for r in rows))
    handles = [Patch(color=FAMILY_COLORS[f], label=f) for f in families]
    handles += acc.get_lines()
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.suptitle(f"{result['task']} on {result['model']}: same split and budget for every method")
    fig.savefig(path, dpi=110)
    plt.close(fig)
