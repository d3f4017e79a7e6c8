"""Tables for the terminal and the goals of issue 7, checked against one run's ratios."""

from __future__ import annotations

import math
from typing import Any

MiB = 2**20

Field = tuple[str, str, str]  # (section, setup, field) in one workload's results


def _step(setup: str) -> Field:
    return ("train", setup, "step_s")


def _peak(setup: str) -> Field:
    return ("train", setup, "tensor_peak")


def _rss(setup: str) -> Field:
    return ("train", setup, "rss_peak_growth")


def _fwd(model: str) -> Field:
    return ("inference", model, "forward_s")


LORA, PEFT = "deltatune-lora", "peft-lora"
# (workload, goal, numerator, denominator, largest ratio that meets it)
GOALS: list[tuple[str, str, Field, Field, float]] = [
    ("minilm", "LoRA step / full fine-tuning step", _step(LORA), _step("full"), 0.75),
    ("minilm", "LoRA step / PEFT LoRA step", _step(LORA), _step(PEFT), 0.90),
    ("minilm", "LoRA peak memory / full fine-tuning", _peak(LORA), _peak("full"), 0.90),
    ("minilm", "LoRA peak memory / PEFT LoRA", _peak(LORA), _peak(PEFT), 0.75),
    ("minilm", "LoRA RSS growth / full fine-tuning", _rss(LORA), _rss("full"), 0.90),
    ("minilm", "LoRA RSS growth / PEFT LoRA", _rss(LORA), _rss(PEFT), 0.75),
    ("smollm2", "LoRA step / full fine-tuning step", _step(LORA), _step("full"), 0.65),
    ("minilm", "unmerged LoRA inference / base", _fwd("deltatune-unmerged"), _fwd("base"), 1.10),
    ("minilm", "merged LoRA inference / base", _fwd("deltatune-merged"), _fwd("base"), 1.05),
    ("smollm2", "unmerged LoRA inference / base", _fwd("deltatune-unmerged"), _fwd("base"), 1.10),
    ("smollm2", "merged LoRA inference / base", _fwd("deltatune-merged"), _fwd("base"), 1.05),
    ("minilm", "DoRA step / LoRA step", _step("deltatune-dora"), _step(LORA), 1.25),
]
QUICK_ALIASES = {"minilm": "tiny-bert", "smollm2": "tiny-llama"}


def _get(results: dict[str, Any], workload: str, path: Field) -> float | None:
    section, setup, field = path
    value = results.get(workload, {}).get(section, {}).get(setup, {}).get(field)
    return float(value) if isinstance(value, (int, float)) else None


def check_goals(results: dict[str, Any], quick: bool = False) -> list[dict[str, Any]]:
    """Every goal whose figures were measured, with its ratio and whether it is met."""
    out = []
    for workload, what, num, den, limit in GOALS:
        key = QUICK_ALIASES[workload] if quick else workload
        a, b = _get(results, key, num), _get(results, key, den)
        if a is None or not b:
            continue
        ratio = a / b
        out.append({"workload": key, "goal": what, "ratio": ratio, "limit": limit, "met": ratio <= limit})
    return out


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a is not None and b and not math.isnan(a) else "-"


def train_table(res: dict[str, Any]) -> str:
    rows = []
    full = res.get("full", {})
    for name, r in res.items():
        if "unavailable" in r:
            rows.append([name, "skipped: " + r["unavailable"]] + [""] * 9)
            continue
        peft_name = "peft-" + name.split("-")[1] if name.startswith("deltatune-") else None
        peft = res.get(peft_name, {}) if peft_name else {}
        vs_peft = (lambda key: _ratio(r[key], peft.get(key)) if peft_name else "")
        rss = r.get("rss_peak_growth")
        rows.append([
            name, f"{r['step_s'] * 1e3:.0f}", _ratio(r["step_s"], full.get("step_s")), vs_peft("step_s"),
            _ratio(r["step_cpu_s"], full.get("step_cpu_s")),
            _mib(r["tensor_peak"]), _ratio(r["tensor_peak"], full.get("tensor_peak")), vs_peft("tensor_peak"),
            _mib(rss) if rss is not None else "-",
            _ratio(rss, full.get("rss_peak_growth")) if rss is not None else "-", f"{r['trainable']:,}",
        ])
    header = ["setup", "step ms", "vs full", "vs peft", "cpu vs full", "peak MiB", "vs full", "vs peft",
              "RSS+ MiB", "vs full", "trainable"]
    return _table(header, rows)


def inference_table(res: dict[str, Any]) -> str:
    base, cpu = res["base"]["forward_s"], res["base"]["forward_cpu_s"]
    rows = [[n, f"{r['forward_s'] * 1e3:.1f}", _ratio(r["forward_s"], base), _ratio(r["forward_cpu_s"], cpu)]
            for n, r in res.items()]
    return _table(["model", "forward ms", "vs base", "cpu vs base"], rows)


def io_table(res: dict[str, Any]) -> str:
    rows = [[lib, f"{r['save_s'] * 1e3:.1f}", f"{r['load_s'] * 1e3:.1f}", f"{r['weights_bytes'] / 1024:.0f}",
             f"{r['total_bytes'] / 1024:.0f}"] for lib, r in res.items()]
    return _table(["library", "save ms", "load ms", "weights KiB", "total KiB"], rows)


def goals_table(goals: list[dict[str, Any]]) -> str:
    rows = [[g["workload"], g["goal"], f"{g['ratio']:.2f}x", f"<= {g['limit']:.2f}x", "yes" if g["met"] else "NO"]
            for g in goals]
    return _table(["workload", "goal", "measured", "target", "met"], rows)


def _mib(n: float) -> str:
    return f"{n / MiB:.0f}" if n >= 10 * MiB else f"{n / MiB:.2f}"


def floor_lines(results: dict[str, Any]) -> list[str]:
    """The frozen-base floor per workload: the step time and tensor peak no adapter can go below
    on torch's own kernels (the model's activations and input gradients, no adapter at all)."""
    lines = []
    for key, res in results.items():
        train = res.get("train", {}) if isinstance(res, dict) else {}
        floor, full = train.get("floor", {}), train.get("full", {})
        if floor.get("step_s") and full.get("step_s"):
            cpu = floor["step_cpu_s"] / full["step_cpu_s"]
            lines.append(f"  {key}: frozen base with input gradients only (no adapter) = "
                         f"{floor['step_s'] / full['step_s']:.2f}x the full fine-tuning step (cpu {cpu:.2f}x)")
        peft_peak = train.get(PEFT, {}).get("tensor_peak")
        if floor.get("tensor_peak") and full.get("tensor_peak") and peft_peak:
            lines.append(f"  {key}: its tensor peak = {floor['tensor_peak'] / full['tensor_peak']:.2f}x full "
                         f"fine-tuning, {floor['tensor_peak'] / peft_peak:.2f}x PEFT LoRA")
    return lines
