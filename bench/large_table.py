"""``python -m bench.large_table``: training memory of an adapter on a 1M × 64 embedding table vs
fine-tuning the whole table.

A recommender's table of 1,000,000 IDs × 64 (an ``nn.EmbeddingBag``, mode sum: multi-hot features),
batches of 1,024 bags of 16 IDs, AdamW, five steps. Setups, each in its own process (peak memory is
per process), taking turns:

- ``full``: the table trains (its gradient and AdamW's two moments are table-sized);
- ``lora-r4`` / ``lora-r8``: LoRA on the table (``LoraEmbeddingBag``), the table frozen;
- ``new-rows-1k``: the table grown by 1,000 rows (``grow_table``) and only those rows trained
  (``TokensConfig(original_vocab_size=1M)``, ``TokenRowsBag``): new IDs, old rows frozen.

Memory is measured two ways: the process's peak resident set growth from just after the table is
built to the end of training (``VmHWM``), and the bytes of every tensor training adds (trainable
parameters of an adapter, gradients, optimizer state), counted after the last step. The goal of
issue #15: the adapter's training uses <= 10 % of full-table fine-tuning's memory.

What LoRA on a table costs is O(rank × rows): A has one r-vector per row, so its gradient and moments
cover every row, not only the rows a batch touches; the ratio is about 4r / (3 · 64) of full
fine-tuning's extra memory. Writes ``bench/results/large_table.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROWS, DIM, BAGS, PER_BAG, STEPS = 1_000_000, 64, 1024, 16, 5
SETUPS = ["full", "lora-r4", "lora-r8", "new-rows-1k"]


def _rss_peak_mb() -> float:
    from deltatune.train.metrics import process_peak_bytes

    return process_peak_bytes()[0] / 2**20


def worker(setup: str, rows: int) -> dict:
    import torch
    from torch import nn

    import deltatune as dt

    torch.set_num_threads(1)
    torch.manual_seed(0)
    table = nn.EmbeddingBag(rows, DIM, mode="sum")
    model = nn.Sequential()
    model.features = table
    before = _rss_peak_mb()
    if setup == "full":
        params = list(model.parameters())
    elif setup == "new-rows-1k":
        old = dt.grow_table(model, "features", 1000)
        before = _rss_peak_mb()  # the grown table is the base here
        dt.attach(model, dt.TokensConfig(target="features", original_vocab_size=old))
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        dt.attach(model, dt.LoraConfig(target="features", rank=int(setup.split("-r")[1]), alpha=8.0))
        params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    g = torch.Generator().manual_seed(1)
    t0 = time.perf_counter()
    for _ in range(STEPS):
        ids = torch.randint(0, rows + (1000 if setup == "new-rows-1k" else 0), (BAGS * PER_BAG,), generator=g)
        offsets = torch.arange(0, BAGS * PER_BAG, PER_BAG)
        loss = model.features(ids, offsets).pow(2).mean()
        opt.zero_grad(set_to_none=False)
        loss.backward()
        opt.step()
    seconds = time.perf_counter() - t0
    nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
    adapter = 0 if setup == "full" else sum(nbytes(p) for p in params)
    grads = sum(nbytes(p.grad) for p in params if p.grad is not None)
    state = sum(nbytes(v) for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0)
    return {"setup": setup, "rss_growth_mb": round(_rss_peak_mb() - before, 1),
            "training_tensors_mb": round((adapter + grads + state) / 2**20, 1),
            "table_mb": round(nbytes(table.weight if setup == "full" else model.features.base.weight) / 2**20, 1),
            "trainable_parameters": sum(p.numel() for p in params), "seconds": round(seconds, 2)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker")
    parser.add_argument("--rows", type=int, default=ROWS)
    parser.add_argument("--out", default="bench/results/large_table.json")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.rows)))
        return
    results = {}
    for setup in SETUPS:  # one process each: the peak never goes down
        out = subprocess.run([sys.executable, "-m", "bench.large_table", "--worker", setup, "--rows", str(args.rows)],
                             capture_output=True, text=True, check=True)
        results[setup] = json.loads(out.stdout.strip().splitlines()[-1])
    full = results["full"]
    print(f"{'setup':<10} {'trainable':>12} {'training tensors':>17} {'RSS growth':>11} {'vs full':>8} {'time':>7}")
    for r in results.values():
        r["ratio_tensors"] = round(r["training_tensors_mb"] / full["training_tensors_mb"], 4)
        r["ratio_rss"] = round(r["rss_growth_mb"] / full["rss_growth_mb"], 4) if full["rss_growth_mb"] else None
        r["ratio_with_table"] = round((r["training_tensors_mb"] + r["table_mb"]) /
                                      (full["training_tensors_mb"] + full["table_mb"]), 4)
        print(f"{r['setup']:<10} {r['trainable_parameters']:>12,} {r['training_tensors_mb']:>14.1f} MiB "
              f"{r['rss_growth_mb']:>7.0f} MiB {100 * r['ratio_tensors']:>7.1f}% {r['seconds']:>6.1f}s")
    record = {"rows": args.rows, "dim": DIM, "bags": BAGS, "ids_per_bag": PER_BAG, "steps": STEPS,
              "results": results, "goal": "adapter training memory <= 10% of full-table fine-tuning",
              "load_average": os.getloadavg(), "cpu_count": os.cpu_count(), "python": platform.python_version()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
