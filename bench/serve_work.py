"""``python -m bench.serve_work``: the work deltatune's serving loop does for a fixed plan of
requests, bare base vs 1 adapter, alternating (a diagnostic of the "1 adapter / base" goal).

``bench/serve.py`` measures throughput in time windows, which on a shared machine swing with the
load by 20-40 % between adjacent windows. This bench fixes the work instead: ``--requests``
requests of ``bench/serve.py``'s plan (seed 1: the same prompts and lengths for both setups),
``--clients`` closed-loop clients, the engine running as in a server (its own thread, continuous
batching, packed prefills, the open router), until the last request ends. Per run: wall time,
process CPU, the engine thread's CPU time in decode passes and prefill passes (``time.thread_time``
around ``Engine._forward``), the decode steps, prefills and mean rows per decode step (so that a
difference in scheduling shows apart from a difference in cost), and the garbage collector's time.
``--pairs`` pairs, the order alternating; each ratio (1 adapter / base) is taken within a pair and
the median reported. ``--quick``: a tiny random Llama, a smoke test.
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from bench.measure import write_json
from bench.serve import DeltatuneSetup, base_dir, load, write_adapters
from bench.serve_load import make_plan


class Meter:
    """Engine-thread CPU time of decode and prefill passes, rows per decode step, GC time."""

    def __init__(self) -> None:
        self.cpu: dict[str, float] = collections.defaultdict(float)
        self.passes: collections.Counter[str] = collections.Counter()
        self.rows: list[int] = []
        self.gc_s = 0.0
        self._gc_start = 0.0

    def clear(self) -> None:
        self.cpu.clear()
        self.passes.clear()
        self.rows.clear()
        self.gc_s = 0.0

    def on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_start = time.perf_counter()
        else:
            self.gc_s += time.perf_counter() - self._gc_start

    def wrap(self, engine: Any) -> None:
        forward = engine._forward

        def timed(names: list, ids: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            t = time.thread_time()
            try:
                return forward(names, ids, *args, **kwargs)
            finally:
                kind = "prefill" if len(args) >= 5 or ids.shape[1] > 1 else "decode"  # (a packed one passes lengths)
                self.cpu[kind] += time.thread_time() - t
                self.passes[kind] += 1
                if kind == "decode":
                    self.rows.append(ids.shape[0])

        engine._forward = timed


def run(setup: DeltatuneSetup, plan: list, clients: int) -> tuple[float, float]:
    """Every request of ``plan`` through ``clients`` closed-loop clients; wall and process CPU seconds."""
    todo, lock = iter(plan), threading.Lock()

    def client() -> None:
        while True:
            with lock:
                item = next(todo, None)
            if item is None:
                return
            adapter, prompt, n = item
            setup.submit(prompt, adapter, n).done.wait()

    c0, w0 = time.process_time(), time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - w0, time.process_time() - c0


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny random Llama: a smoke test")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("bench/results/serve-work.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import tempfile

    meter = Meter()
    gc.callbacks.append(meter.on_gc)
    runs: list[dict[str, Any]] = []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        base = base_dir(args.quick, Path(tmp))
        dirs = {f"a{i:03d}": p for i, p in enumerate(write_adapters(base, Path(tmp) / "adapters", 1))}
        model, tok = load(base)
        setup = DeltatuneSetup(model, tok, dirs, 1, args.clients)
        meter.wrap(setup.engine)
        try:
            for k in range(args.pairs):
                for m in ((0, 1) if k % 2 == 0 else (1, 0)):
                    names: list[str | None] = [None] if m == 0 else ["a000"]
                    setup.prepare([n for n in names if n is not None])
                    plan = make_plan(names, args.requests, 16, 16, model.config.vocab_size, seed=1)
                    meter.clear()
                    wall, cpu = run(setup, plan, args.clients)
                    row = {"pair": k, "setup": "base" if m == 0 else "1 adapter", "wall_s": wall, "process_cpu_s": cpu,
                           "decode_cpu_s": meter.cpu["decode"], "prefill_cpu_s": meter.cpu["prefill"],
                           "decode_steps": meter.passes["decode"], "prefills": meter.passes["prefill"],
                           "rows_per_decode": statistics.mean(meter.rows) if meter.rows else 0.0,
                           "gc_s": meter.gc_s}
                    runs.append(row)
                    print(json.dumps(row), flush=True)
        finally:
            setup.close()
            gc.callbacks.remove(meter.on_gc)
    ratios = {}
    for key in ("wall_s", "process_cpu_s", "decode_cpu_s", "prefill_cpu_s"):
        within = []
        for k in range(args.pairs):
            one = next(r for r in runs if r["pair"] == k and r["setup"] == "1 adapter")
            bare = next(r for r in runs if r["pair"] == k and r["setup"] == "base")
            within.append(one[key] / bare[key])
        ratios[f"1 adapter / base, {key}"] = {"median": statistics.median(within), "pairs": [round(x, 4) for x in within]}
        print(f"1 adapter / base, {key:14s} median {statistics.median(within):.3f}  pairs {[round(x, 3) for x in within]}")
    out = {"command": "python -m bench.serve_work " + " ".join(argv if argv is not None else sys.argv[1:]),
           "setup": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
           "machine": {"torch": torch.__version__, "threads": torch.get_num_threads(), "cores": os.cpu_count(),
                       "loadavg_before": load_before, "loadavg_at_end": os.getloadavg()},
           "runs": runs, "ratios": ratios}
    write_json(args.out, out)
    return out


if __name__ == "__main__":
    main()
