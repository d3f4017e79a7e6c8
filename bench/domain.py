"""Domain adaptation goals: held-out perplexity of the code default, and held-out reply loss of
instruct on a user JSONL, each against the unadapted SmolLM2 base.

    .venv/bin/python -m bench.domain --which text       # task text's built-in default (caps below)
    .venv/bin/python -m bench.domain --which instruct   # a docstring Q&A JSONL built from the stdlib

``instruct`` writes a small user data set first: for public functions of a few stdlib modules,
``{"prompt": "What does <module>.<function>() do in Python?", "response": <the docstring's first
sentence>}``, parsed from the source with ``ast`` (nothing imported). Each run is ``deltatune
train`` in a subprocess; the figures come from its ``metrics.json`` and go to
``bench/results/domain-<which>.json``. ``--train-blocks`` / ``--examples`` shrink a run for a
loaded machine (say so when reporting).

    .venv/bin/python -m bench.domain --which text --from-run runs/text      # figures of a run already made
    .venv/bin/python -m bench.domain --which text --from-run runs/text --all-held-out

``--from-run`` takes the figures from the ``metrics.json`` of a ``deltatune train --set task=text``
run made by hand (e.g. the plain default) instead of training again. ``--all-held-out`` also scores
that run's adapter, and the base with the adapter off, on *every* block of the held-out test
modules (the default caps the test split at 48 blocks, the first few modules), to show the
figure does not hinge on which modules come first.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

MODULES = ("json", "textwrap", "shutil", "random", "statistics", "string", "fnmatch", "glob", "heapq", "bisect",
           "calendar", "difflib", "base64", "csv", "gzip", "zipfile", "tarfile", "pathlib", "tempfile", "secrets",
           "ipaddress", "fractions", "decimal", "copy", "pprint", "shlex", "filecmp", "operator", "functools")


def docstring_qa(limit: int) -> list[dict[str, str]]:
    """(prompt, response) pairs from public module-level functions' docstrings, in module order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    rows = []
    for name in MODULES:
        path = root / f"{name}.py"
        if not path.is_file():
            continue
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
                doc = ast.get_docstring(node)
                if doc:
                    first = " ".join(doc.split("\n\n")[0].split())
                    sentence = first.split(". ")[0].rstrip(".") + "."
                    if 20 <= len(sentence) <= 300:
                        rows.append({"prompt": f"What does {name}.{node.name}() do in Python?",
                                     "response": sentence})
    return rows[:limit]


def train(out: Path, settings: list[str]) -> dict:
    command = [sys.executable, "-m", "deltatune", "train", "--no-progress", "--overwrite", "--output", str(out),
               *(arg for s in settings for arg in ("--set", s))]
    print(" ".join(command), flush=True)
    subprocess.run(command, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return json.loads((out / "metrics.json").read_text())


def _settings(run_dir: Path) -> dict:
    """The run's recorded config (``config.yaml``) as a dict, so the JSON says what was trained."""
    import yaml

    path = run_dir / "config.yaml"
    return yaml.safe_load(path.read_text()) if path.is_file() else {}


def score_all_held_out(run_dir: Path, threads: int | None) -> dict:
    """Perplexity of the run's adapter and of the base (adapter off) on every held-out test block."""
    import time

    import torch

    import deltatune as dt
    from deltatune.train import load_trained
    from deltatune.train.loop import make_runner, pick_device

    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    trained = load_trained(run_dir, {"data": {"max_eval_examples": 10**9}})  # no cap on the held-out blocks
    config, task = trained.config, trained.task
    device = pick_device(config.device)
    trained.model.to(device)
    test = task.load_splits(config, trained.labels).test
    items = task.encode(trained.tokenizer, test, config.max_length)
    run = make_runner(device, config.precision)
    adapted = task.evaluate(trained.model, items, trained.tokenizer, config.eval_batch_size, run)
    with dt.disabled(trained.model):
        base = task.evaluate(trained.model, items, trained.tokenizer, config.eval_batch_size, run)
    out = {"modules": [Path(where).name for _, where in test], "blocks": len(items),
           "tokens": sum(len(it["input_ids"]) - 1 for it in items),
           "test_perplexity": adapted["perplexity"], "base_test_perplexity": base["perplexity"],
           "perplexity_reduction": 1.0 - adapted["perplexity"] / base["perplexity"],
           "seconds": round(time.perf_counter() - start, 1), "load_average": list(os.getloadavg())}
    print(json.dumps(out, indent=2), flush=True)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--which", choices=("text", "instruct"), required=True)
    parser.add_argument("--work", type=Path, default=Path("runs/bench-domain"))
    parser.add_argument("--train-blocks", type=int, default=None, help="text: cap the training blocks")
    parser.add_argument("--eval-blocks", type=int, default=None, help="text: cap the held-out blocks")
    parser.add_argument("--examples", type=int, default=400, help="instruct: Q&A pairs written")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--from-run", type=Path, default=None, help="use this finished run's metrics.json")
    parser.add_argument("--all-held-out", action="store_true", help="text: also score every held-out block")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/domain-WHICH.json)")
    args = parser.parse_args(argv)
    extra = [f"threads={args.threads}"] if args.threads else []
    run_dir = args.from_run
    if run_dir is not None:
        metrics = json.loads((run_dir / "metrics.json").read_text())
    elif args.which == "text":
        caps = ([f"data.max_train_examples={args.train_blocks}"] if args.train_blocks else []) + (
            [f"data.max_eval_examples={args.eval_blocks}"] if args.eval_blocks else [])
        run_dir = args.work / "text"
        metrics = train(run_dir, ["task=text", *caps, *extra])
    else:
        data = args.work / "docstring-qa.jsonl"
        data.parent.mkdir(parents=True, exist_ok=True)
        rows = docstring_qa(args.examples)
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"wrote {len(rows)} Q&A pairs to {data}")
        run_dir = args.work / "instruct"
        metrics = train(run_dir, ["task=instruct", f"data.path={data}", "max_length=128",
                                  "data.validation_fraction=0.1", "data.test_fraction=0.15", *extra])
    keys = (("test_perplexity", "base_test_perplexity", "perplexity_reduction", "train_tokens", "test_tokens")
            if args.which == "text" else
            ("test_loss", "base_test_loss", "test_perplexity", "base_test_perplexity", "sample_rouge_l",
             "base_sample_rouge_l"))
    result = {k: metrics.get(k) for k in keys}
    result.update(steps=metrics["steps"], train_seconds=metrics["train_seconds"],
                  total_seconds=metrics.get("total_seconds"), load_average=metrics["load_average"],
                  cpu_count=metrics["cpu_count"], caps={"train_blocks": args.train_blocks, "examples": args.examples},
                  run=str(run_dir), settings=_settings(run_dir))
    if args.which == "text" and args.all_held_out:
        result["all_held_out"] = score_all_held_out(run_dir, args.threads)
    print(json.dumps(result, indent=2))
    target = args.out or Path(__file__).parent / "results" / f"domain-{args.which}.json"
    target.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {target}")
    return result


if __name__ == "__main__":
    main()
