"""``python -m bench.train_ab OLD NEW``: the same ``deltatune train`` job on two commits, interleaved.

Each commit's ``src/`` is taken with ``git archive`` into a temporary directory; the job runs as a
fresh process per run, alternating (OLD NEW NEW OLD ...), on the same environment, data and
seed. Reports end-to-end wall time of each process and the run's own ``train_seconds`` (from
``metrics.json``), medians, and NEW / OLD ratios. ``--set key=value`` passes options to both
(default: the built-in defaults, with ``data.max_train_examples`` and ``data.max_eval_examples``
cut so one run takes about a minute). Writes ``bench/results/train-ab.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def extract(rev: str, into: Path) -> Path:
    """``src/`` of commit ``rev`` under ``into`` (returns the src directory)."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", rev, "src"],
                             check=True, capture_output=True).stdout
    into.mkdir(parents=True)
    tar = into / "src.tar"
    tar.write_bytes(archive)
    with tarfile.open(tar) as t:
        t.extractall(into, filter="data")
    return into / "src"


def run_once(src: Path, out: Path, sets: list[str], threads: int) -> dict:
    cmd = [sys.executable, "-m", "deltatune", "train", "--output", str(out), "--overwrite"]
    for s in [*sets, f"threads={threads}"]:
        cmd += ["--set", s]
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=out.parent)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"train failed with {src}:\n{done.stderr[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    return {"wall_s": wall, "train_s": metrics["train_seconds"], "precision": metrics.get("precision"),
            "accuracy": metrics.get("test_accuracy"), "macro_f1": metrics.get("test_macro_f1"),
            "total_s": metrics.get("total_seconds"), "train_cpu_s": metrics.get("train_cpu_seconds")}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.train_ab", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("old")
    p.add_argument("new")
    p.add_argument("--pairs", type=int, default=2, help="OLD/NEW pairs (order alternates)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--set", dest="sets", action="append",
                   default=None, help="key=value for both runs (repeatable)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "train-ab.json")
    args = p.parse_args(argv)
    sets = args.sets or ["data.max_train_examples=1920", "data.max_eval_examples=512"]
    runs: dict[str, list[dict]] = {"old": [], "new": []}
    with tempfile.TemporaryDirectory() as tmp:
        srcs = {k: extract(getattr(args, k), Path(tmp) / k) for k in ("old", "new")}
        load0 = os.getloadavg()
        for i in range(args.pairs):
            for k in (("old", "new") if i % 2 == 0 else ("new", "old")):
                r = run_once(srcs[k], Path(tmp) / f"run-{k}", sets, args.threads)
                runs[k].append(r)
                print(f"{k} ({getattr(args, k)}): {r}", flush=True)
    # train_cpu_s: the steps' process CPU time (all threads), less moved by other load than wall time;
    # only where both commits record it
    measures = [m for m in ("wall_s", "train_s", "train_cpu_s") if all(r.get(m) for v in runs.values() for r in v)]
    med = {k: {m: statistics.median(r[m] for r in v) for m in measures} for k, v in runs.items()}
    res = {"old": args.old, "new": args.new, "sets": sets, "threads": args.threads, "runs": runs, "median": med,
           "ratio_new_over_old": {m: med["new"][m] / med["old"][m] for m in measures},
           "speedup": {m: med["old"][m] / med["new"][m] for m in measures},
           "loadavg_start": load0, "loadavg_end": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(json.dumps({k: res[k] for k in ("median", "speedup", "loadavg_start", "loadavg_end")}, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
