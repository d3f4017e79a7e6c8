"""``python -m bench.tune_unseen``: ``deltatune tune``'s pick against the default LoRA on data tune never saw.

The data: every utterance of chatterbot-corpus's English conversations (prompts and replies), labelled
with its category (the YAML file's name: ``ai``, ``trivia``, ``psychology``, ... 21 in all; the
chat task trains *on* these conversations, tune was never developed or tuned on classifying them).
It is built at run time from the installed package into CSV files under ``--dir`` (never into the
repository): texts deduplicated across the whole corpus first, then each category's conversations
split with the seed into train / validation / test (a conversation stays in one split, so a prompt
and its reply never sit on both sides; a category with one conversation stays in train).

Per seed (the split, the training seed and the sampler's seed), on all-MiniLM-L6-v2, one thread:

* the default: ``deltatune train --set task=classification --set data.train=...`` with nothing else
  set, i.e. the method, rank, targets, learning rate and epochs a user gets by default (LoRA);
* tune: ``deltatune tune`` on the same files for ``--trials`` trials (every method, its default pruner), then
  its pick (best *validation* accuracy) is scored on the test split, which tune never selects on.

Reports test accuracy of both, the gain in points, and tune's compute (training examples and
seconds) as a multiple of the default run's. Writes ``bench/results/tune_unseen.json``.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import random
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SPLITS = (("test", 0.25), ("validation", 0.15))  # the rest trains


def conversations() -> list[tuple[str, list[str]]]:
    """(category, [utterances]) per conversation, in file order, each text kept only where it first appears."""
    import yaml

    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("needs chatterbot-corpus: pip install --no-deps chatterbot-corpus==1.3.3")
    root = Path(spec.submodule_search_locations[0]) / "data" / "english"
    seen: set[str] = set()
    out = []
    for path in sorted(root.glob("*.yml")):
        for conv in yaml.safe_load(path.read_text()).get("conversations") or []:
            texts = []
            for text in conv:
                key = " ".join(str(text).casefold().split()) if isinstance(text, str) else ""
                if key and key not in seen:
                    seen.add(key)
                    texts.append(" ".join(text.split()))
            if texts:
                out.append((path.stem, texts))
    return out


def build(directory: Path, seed: int) -> dict[str, Any]:
    """Write ``train.csv``, ``validation.csv``, ``test.csv`` (text,label) for ``seed``; return their paths and sizes."""
    by_label: dict[str, list[list[str]]] = defaultdict(list)
    for label, texts in conversations():
        by_label[label].append(texts)
    rows: dict[str, list[tuple[str, str]]] = {"train": [], "validation": [], "test": []}
    rng = random.Random(seed)
    for label in sorted(by_label):
        convs = by_label[label]
        rng.shuffle(convs)
        start = 0
        for split, share in SPLITS:  # at least one conversation left for train
            n = min(round(share * len(convs)), len(convs) - 1 - start)
            rows[split] += [(t, label) for conv in convs[start:start + max(n, 0)] for t in conv]
            start += max(n, 0)
        rows["train"] += [(t, label) for conv in convs[start:] for t in conv]
    directory.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, items in rows.items():
        rng.shuffle(items)
        files[split] = directory / f"{split}.csv"
        with files[split].open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            writer.writerows(items)
    return {"files": {k: str(v) for k, v in files.items()}, "sizes": {k: len(v) for k, v in rows.items()},
            "labels": len(by_label)}


def overrides(data: dict[str, Any], seed: int) -> list[str]:
    files = data["files"]
    return ["task=classification", f"data.train={files['train']}", f"data.validation={files['validation']}",
            f"data.test={files['test']}", f"seed={seed}", "threads=1"]


def default_run(sets: list[str], out: Path) -> dict[str, Any]:
    from deltatune.train.config import load_config
    from deltatune.train.run import run_training

    config = load_config(None, sets, output=out)
    m = run_training(config, progress=False, overwrite=True)
    return {"method": config.method, "lr": config.lr, "epochs": config.epochs,
            "validation_accuracy": m["validation"][-1]["accuracy"], "test_accuracy": m["test_accuracy"],
            "examples": round(m["examples_per_second"] * m["train_seconds"]), "train_seconds": m["train_seconds"]}


def one_seed(seed: int, trials: int, directory: Path) -> dict[str, Any]:
    from deltatune.train.tune import DEFAULT_PRUNER, run_tune

    data = build(directory / f"data-{seed}", seed)
    sets = overrides(data, seed)
    t0 = time.time()
    default = default_run(sets, directory / f"default-{seed}")
    default["wall_seconds"] = round(time.time() - t0, 1)
    t0 = time.time()
    t = run_tune(sets, "all", None, trials=trials, output=directory / f"tune-{seed}", seed=seed)
    best = t["best"]
    tuned = {"pruner": DEFAULT_PRUNER, "pick": best["label"], "lr": best["lr"], "validation_accuracy": best["value"],
             "test_accuracy": best["test_metric"], "examples": t["compute"]["examples"],
             "train_seconds": t["compute"]["train_seconds"], "wall_seconds": round(time.time() - t0, 1),
             "states": [r["state"] for r in t["trials"]]}
    gain = round(100 * (tuned["test_accuracy"] - default["test_accuracy"]), 2)
    print(f"seed {seed}: default {default['method']} test {default['test_accuracy']:.4f}; tune pick {tuned['pick']} "
          f"lr {tuned['lr']:.3g} test {tuned['test_accuracy']:.4f} ({gain:+.2f} points); tune's compute "
          f"{tuned['examples'] / default['examples']:.1f}x the default run's examples", flush=True)
    return {"seed": seed, "data": data["sizes"], "labels": data["labels"], "default": default, "tune": tuned,
            "gain_points": gain, "compute_multiple_examples": round(tuned["examples"] / default["examples"], 2)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds (split, training, sampler)")
    parser.add_argument("--dir", type=Path, default=Path("runs/bench-tune-unseen"), help="data and runs (not the repo)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/tune_unseen.json"))
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    results = [one_seed(int(s), args.trials, args.dir) for s in args.seeds.split(",")]
    wins = sum(r["gain_points"] > 0 for r in results)
    summary = {"data": "chatterbot-corpus english utterances -> 21 categories (grouped by conversation)",
               "model": "all-minilm-l6-v2", "trials": args.trials, "seeds": results,
               "wins": wins, "mean_gain_points": round(sum(r["gain_points"] for r in results) / len(results), 2),
               "load_average_before": load_before, "load_average_after": os.getloadavg()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"tune's pick beat the default on {wins} of {len(results)} seeds; mean gain "
          f"{summary['mean_gain_points']:+.2f} points; wrote {args.out}")


if __name__ == "__main__":
    main()
