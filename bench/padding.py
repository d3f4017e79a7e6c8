"""Padding share of the training batches: length-bucketed instruct vs plain random batches, and packed text.

    .venv/bin/python -m bench.padding            # tokenizer only, no model runs: about a minute

For each built-in data set it builds one epoch's batches exactly as ``deltatune train`` does
(``data.epoch_batches``: shuffled, each pool of 50 batches sorted by length) and, beside it, the
same examples in plain shuffled batches; the padding share is padded positions / all positions of
the padded (B, T) batches. Writes ``bench/results/padding.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import torch

from deltatune.train.config import load_config
from deltatune.train.data import epoch_batches
from deltatune.train.models import load_tokenizer, resolve_model
from deltatune.train.tasks import get_task


def share(lengths: list[int], batches: list[list[int]]) -> float:
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return 1.0 - sum(lengths[i] for b in batches for i in b) / padded


def random_batches(n: int, size: int, seed: int) -> list[list[int]]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return [order[i:i + size] for i in range(0, n, size)]


def measure(task_name: str, overrides: list[str]) -> dict:
    config = load_config(None, [f"task={task_name}", *overrides])
    task = get_task(task_name)
    tokenizer = load_tokenizer(resolve_model(config.model))
    splits = task.load_splits(config)
    items = task.encode(tokenizer, splits.train, config.max_length)
    lengths = [len(it["input_ids"]) for it in items]
    size = config.batch_size
    bucketed = epoch_batches(lengths, size, config.seed, 0)
    return {"task": task_name, "examples": len(items), "batch_size": size, "max_length": config.max_length,
            "tokens": sum(lengths), "padding_share": round(share(lengths, bucketed), 4),
            "padding_share_random_batches": round(share(lengths, random_batches(len(items), size, config.seed)), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "padding.json")
    args = parser.parse_args()
    rows = [measure("instruct", []),      # the built-in chatterbot conversations
            measure("text", [])]          # the stdlib source, packed into 256-token blocks
    for r in rows:
        print(f"{r['task']:9s} {r['examples']:6,} examples, batch {r['batch_size']}: padding "
              f"{100 * r['padding_share']:.1f}% of positions (plain random batches: "
              f"{100 * r['padding_share_random_batches']:.1f}%)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "python": platform.python_version(),
                                    "cpu_count": os.cpu_count()}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
