"""``python -m bench.serve_pairs``: deltatune's engine with 1 adapter vs M adapters, in adjacent windows.

A diagnostic beside ``bench/serve.py`` (which measures its deltatune rows in chains of adjacent
windows too, next to PEFT's rows): the engine alone (no PEFT copies in the process), ``--pairs`` pairs of windows, the
1-adapter row and the M-adapter row back to back, the order alternating from pair to pair, each on
``bench/serve.py``'s plan (seed 1: the same prompts and lengths for every M), 16 clients, 3 s warm-up + 22 s measured as there.
Prints each window, then each pair's ratio (M / 1, tokens/s) and their median; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.measure import write_json
from bench.serve import DeltatuneSetup, base_dir, load, write_adapters
from bench.serve_load import drive, make_plan


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny random Llama: a smoke test")
    ap.add_argument("--pairs", type=int, default=6)
    ap.add_argument("--adapters", type=int, default=32, help="M, compared with 1 adapter")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--seconds", type=float, default=22.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("bench/results/serve-pairs.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    m_many = args.adapters
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        base = base_dir(args.quick, Path(tmp))
        dirs = {f"a{i:03d}": p for i, p in enumerate(write_adapters(base, Path(tmp) / "ad", m_many))}
        model, tok = load(base)
        setup = DeltatuneSetup(model, tok, dirs, m_many, args.clients)
        try:
            for k in range(args.pairs):
                got = {}
                for m in ((1, m_many) if k % 2 == 0 else (m_many, 1)):
                    names = list(dirs)[:m]
                    setup.prepare(names)
                    plan = make_plan(names, 4096, 16, 16, model.config.vocab_size, seed=1)
                    row = drive(setup, plan, args.clients, args.warmup, args.seconds)
                    got[m] = row["tokens_per_s"]
                    print(k, m, row["tokens_per_s"], row["failed"], time.strftime("%H:%M:%S"), flush=True)
                out.append({"order": list(got), "one": got[1], "many": got[m_many], "ratio": got[m_many] / got[1]})
        finally:
            setup.close()
    result = {"command": "python -m bench.serve_pairs " + " ".join(argv if argv is not None else sys.argv[1:]),
              "adapters": m_many, "pairs": out, "median_ratio": statistics.median(o["ratio"] for o in out),
              "loadavg_at_end": os.getloadavg()}
    print(json.dumps(result))
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
