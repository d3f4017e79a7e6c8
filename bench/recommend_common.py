"""What the recommender benches share: a ``mean ± se`` cell, an atomic JSON write, a per-run progress line."""

from __future__ import annotations

import os
import time
from typing import Any


def pm(v: dict[str, float] | tuple[float, float] | list[float], signed: bool = False) -> str:
    """``0.1234 ± 0.0012`` (``+0.1234 ± ...`` when ``signed``) from ``{"mean", "se"}`` or ``(mean, se)``."""
    mean, se = (v["mean"], v["se"]) if isinstance(v, dict) else v
    return f"{mean:{'+' if signed else ''}.4f} ± {se:.4f}"


def progress(label: str, run: dict[str, Any], test: str, t0: float, load: bool = False) -> None:
    """One line per finished run: its validation NDCG@10 per epoch, ``test``, its seconds and all so far."""
    tail = f", load {os.getloadavg()[0]:.1f}" if load else ""
    print(f"{label}: val {[round(v['ndcg_10'], 4) for v in run['validation']]} test {test} "
          f"({run['seconds']} s, {time.perf_counter() - t0:.0f} s in all{tail})", flush=True)
