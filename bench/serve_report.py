"""The report of ``python -m bench.serve``: medians over rounds, the ratios (32/1, 256/1, 1/base,
deltatune/PEFT per M), the goals, and the JSON written atomically."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench.measure import write_json

GOALS = {"32 adapters / 1 adapter": 0.8, "256 adapters (32 attached) / 1 adapter": 0.6, "1 adapter / base": 0.9}


def row_line(r: int, key: str, row: dict[str, Any], began: float) -> str:
    """One measured row, as printed while the run goes."""
    return (f"round {r}  {key:24s} {row['tokens_per_s']:8.1f} tok/s {row['requests_per_s']:6.2f} req/s  "
            f"ttft p50 {_s(row['ttft_p50_s'])}  latency p50 {_s(row['latency_p50_s'])} / p99 "
            f"{_s(row['latency_p99_s'])}  finished {row['finished']} failed {row['failed']}  "
            f"[{time.time() - began:.0f} s]")


def summary(args: Any, argv: list[str] | None, began: float, results: dict[str, list[dict]],
            counts: list[int], chains: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The run's JSON: medians over rounds per row (a field kept when no round lacks it), every
    round's figures, the ratios, the goals and which rows are ahead of PEFT. ``chains``: deltatune's
    rows in adjacent windows (``{"order": [...], "tokens_per_s": {"base": x, "1 adapter": y, ...}}``);
    then each deltatune ratio (1 / base, M / 1) is the median of its ratio within each chain, listed
    per chain under ``"ratios"``, and the ratio of the rows' medians is kept as "..., ratio of row
    medians"."""
    table = {k: {f: statistics.median(x[f] for x in runs) for f in runs[0]
                 if all(x[f] is not None for x in runs)} for k, runs in results.items()}
    ratios = _ratios(table, counts)
    for chain in chains or []:
        chain["ratios"] = _chain_ratios(chain["tokens_per_s"], counts)
    for key in {k for chain in chains or [] for k in chain["ratios"]}:
        within = [c["ratios"][key] for c in chains or [] if c["ratios"].get(key) is not None]
        if key in ratios:
            ratios[f"{key}, ratio of row medians"] = ratios[key]
        ratios[key] = statistics.median(within)
    return {
        "command": "python -m bench.serve " + " ".join(argv if argv is not None else sys.argv[1:]),
        "setup": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
                    "cores": os.cpu_count(), "loadavg_at_end": os.getloadavg()},
        "wall_s": time.time() - began, "rows": table, "rounds": results, "ratios": ratios,
        "chains": chains or [],
        "goals": {k: {"target": v, "measured": ratios.get(k), "met": ratios.get(k, 0) >= v}
                  for k, v in GOALS.items()},
        "ahead_of_peft": {k: v > 1.0 for k, v in ratios.items() if "/ peft" in k}}


def write(out: dict[str, Any], path: Path) -> None:
    """Print the ratios, the pairs' ratios and the goals; write the JSON atomically."""
    for key in GOALS:
        within = [c["ratios"].get(key) for c in out.get("chains", [])]
        if any(x is not None for x in within):
            print(f"{key} by chain: " + " ".join("-" if x is None else f"{x:.3f}" for x in within))
    print(json.dumps({"ratios": out["ratios"], "goals": out["goals"]}, indent=1))
    write_json(path, out)


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f} s"


def _label(m: int) -> str:
    return f"{m} adapters / 1 adapter" if m <= 32 else f"{m} adapters (32 attached) / 1 adapter"


def _chain_ratios(tps: dict[str, float], counts: list[int]) -> dict[str, float | None]:
    """One chain's ratios: 1 adapter / base and, for each M > 1, M adapters / 1 adapter."""
    def ratio(a: str, b: str) -> float | None:
        return tps[a] / tps[b] if tps.get(a) is not None and tps.get(b) else None

    out = {"1 adapter / base": ratio("1 adapter", "base")}
    out.update({_label(m): ratio(f"{m} adapters", "1 adapter") for m in counts if m > 1})
    return out


def _ratios(table: dict[str, dict], counts: list[int]) -> dict[str, float]:
    def tps(key: str) -> float | None:
        return table.get(key, {}).get("tokens_per_s")

    ratios: dict[str, float] = {}
    one = tps("deltatune M=1")
    if one and tps("deltatune M=base"):
        ratios["1 adapter / base"] = one / tps("deltatune M=base")
    for m in counts:
        if m > 1 and one and tps(f"deltatune M={m}"):
            ratios[_label(m)] = tps(f"deltatune M={m}") / one
        for peft in ("peft-switch", "peft-batched"):
            if tps(f"deltatune M={m}") and tps(f"{peft} M={m}"):
                ratios[f"deltatune / {peft}, M={m}"] = tps(f"deltatune M={m}") / tps(f"{peft} M={m}")
    return ratios
