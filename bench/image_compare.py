"""``deltatune compare --task image`` at a scale where methods separate: MobileNetV2 on Fashion-MNIST.

    python -m bench.image_compare --stage sweep       # full fine-tuning's learning rate, chosen on validation
    python -m bench.image_compare --stage table       # the README table (uses the sweep's choice)
    python -m bench.image_compare --stage batchnorm   # LoRA with BatchNorm frozen / affine / update
    python -m bench.image_compare --stage all
    python -m bench.image_compare --stage variants --variant 'lora-r3:lora:lora.adapter.rank=3,set=data.image.batchnorm=affine'
    python -m bench.image_compare --stage report      # print the tables from the JSON

Every run is one ``deltatune compare`` (``train/compare.py``: each method trains in its own fresh
process, so peak memory is per method), all with the same budget: ``--size`` pixels square,
``--train`` of the 57,000 training pictures, ``--epochs``, batch 32, seed 0, fp32, ``--threads``.
Validation is the seeded 5 % of the official training set (3,000 pictures); every row is scored on
all 10,000 official test pictures. Choices (full fine-tuning's learning rate, the BatchNorm mode)
are made on validation accuracy, never on test. Each stage adds its part to ``--json`` (read,
updated, written atomically), so stages can run one at a time. Nothing here is interleaved: the
rows are sequential runs on a shared machine, so the load average of each run is recorded with it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import time
from pathlib import Path
from typing import Any

TABLE_METHODS = "full,partial,lora,dora,bitfit,bottleneck,visual_prompt"


def budget(args: argparse.Namespace) -> list[str]:
    """The ``--set`` overrides every run shares."""
    return ["task=image", f"data.image.size={args.size}", f"data.max_train_examples={args.train}",
            "data.max_eval_examples=10000", f"epochs={args.epochs}", f"threads={args.threads}", *args.set]


def command(methods: str, output: Path, overrides: list[str], per_method: list[str]) -> str:
    """The ``deltatune compare`` command line that does what :func:`compare` does."""
    parts = ["deltatune", "compare", "--methods", methods, "--output", str(output)]
    for o in overrides:
        parts += ["--task", o.split("=", 1)[1]] if o.startswith("task=") else ["--set", o]
    for o in per_method:
        parts += ["--set-method", o]
    return shlex.join(parts)


def compare(label: str, methods: str, output: Path, overrides: list[str], per_method: list[str]) -> list[dict]:
    from deltatune.train.compare import run_comparison

    print(f"== {label}: {command(methods, output, overrides, per_method)}", flush=True)
    load = os.getloadavg()
    result = run_comparison(methods, output, overrides, per_method)
    rows = []
    for r in result["rows"]:
        m = r.get("metrics") or {}
        val = [v["accuracy"] for v in m.get("validation", [])]
        rows.append({
            "label": label, "method": r["method"], "status": r["status"], "error": r["error"], "lr": r["lr"],
            "validation_accuracy": val[-1] if val else None, "validation_curve": val,
            "test_accuracy": r["accuracy"], "test_macro_f1": r["macro_f1"],
            "trainable_parameters": r["trainable_parameters"], "total_parameters": r["total_parameters"],
            "trainable_share": r["trainable_share"], "adapter_bytes": r["adapter_bytes"],
            "train_seconds": r["train_seconds"], "peak_memory_mb": r["peak_memory_mb"],
            "wall_seconds": r["wall_seconds"], "load_average_during": m.get("load_average"),
            "adapter": (r["config"] or {}).get("adapter"),
            "batchnorm": ((r["config"] or {}).get("data") or {}).get("image", {}).get("batchnorm"),
        })
    print(f"   load average {load[0]:.1f} -> {os.getloadavg()[0]:.1f}; splits {result['splits']['train']} / "
          f"{result['splits']['validation']} / {result['splits']['test']}", flush=True)
    for row in rows:
        print(f"   {row['method']:14s} lr {row['lr']:<8g} val {row['validation_accuracy']} test {row['test_accuracy']} "
              f"trainable {row['trainable_share']}", flush=True)
    return rows


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def save(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def best_on_validation(rows: list[dict]) -> dict:
    return max((r for r in rows if r["status"] == "ok"), key=lambda r: r["validation_accuracy"])


def markdown(rows: list[dict]) -> str:
    """The README's table: one line per row."""
    lines = ["| method | test accuracy | validation | trainable | adapter / model on disk | train time | peak RSS | lr |",
             "|:--|--:|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['label']} | error: {r['error']} | | | | | | |")
            continue
        lines.append(f"| {r['label']} | {r['test_accuracy']:.4f} | {r['validation_accuracy']:.4f} | "
                     f"{r['trainable_parameters']:,} ({100 * r['trainable_share']:.2f}%) | "
                     f"{r['adapter_bytes'] / 2**20:.2f} MiB | {r['train_seconds']:.0f} s | {r['peak_memory_mb']:.0f} MiB | "
                     f"{r['lr']:g} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=["sweep", "table", "batchnorm", "variants", "all", "report"], default="all")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--train", type=int, default=4000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--full-lrs", default="1e-4,3e-4,1e-3", help="full fine-tuning's sweep")
    parser.add_argument("--set", action="append", default=[], help="another override for every run")
    parser.add_argument("--variant", action="append", default=[],
                        help="with --stage variants: LABEL:METHODS[:METHOD.key=value,...] (runs as one compare)")
    parser.add_argument("--runs", default="runs/image-compare")
    parser.add_argument("--json", default="bench/results/image_compare.json")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    runs, out = Path(args.runs), Path(args.json)
    data = load(out)
    shared = budget(args)
    data["budget"] = {"size": args.size, "train": args.train, "epochs": args.epochs, "threads": args.threads,
                      "overrides": shared, "cpu_count": os.cpu_count()}
    stages = ["sweep", "batchnorm", "table"] if args.stage == "all" else [args.stage]

    if "sweep" in stages:
        rows = []
        for lr in args.full_lrs.split(","):
            rows += compare(f"full lr={lr}", "full", runs / f"full-lr-{lr}", shared, [f"full.lr={lr}"])
        data["full_lr_sweep"] = {"rows": rows, "chosen_lr": best_on_validation(rows)["lr"],
                                 "chosen_by": "validation accuracy after the last epoch"}
        save(out, data)

    if "batchnorm" in stages:
        rows = []
        for mode in ("frozen", "affine", "update"):
            rows += compare(f"lora batchnorm={mode}", "lora", runs / f"bn-{mode}",
                            [*shared, f"data.image.batchnorm={mode}"], [])
        data["batchnorm"] = {"rows": rows, "best_on_validation": best_on_validation(rows)["batchnorm"]}
        save(out, data)

    if "table" in stages:
        full_lr = data.get("full_lr_sweep", {}).get("chosen_lr")
        if full_lr is None:
            raise SystemExit("run --stage sweep first (full fine-tuning's learning rate is chosen on validation)")
        main_rows = compare("table", TABLE_METHODS, runs / "table", shared,
                            [f"full.lr={full_lr}", "partial.adapter.last_n=0"])
        for r in main_rows:
            r["label"] = "linear probe (partial, last_n 0)" if r["method"] == "partial" else r["method"]
        last_n = compare("last-3", "partial", runs / "last-3", shared, ["partial.adapter.last_n=3"])
        for r in last_n:
            r["label"] = "last 3 blocks (partial, last_n 3)"
        data["table"] = {"rows": main_rows + last_n, "commands": [
            command(TABLE_METHODS, runs / "table", shared, [f"full.lr={full_lr}", "partial.adapter.last_n=0"]),
            command("partial", runs / "last-3", shared, ["partial.adapter.last_n=3"])]}
        save(out, data)

    if "variants" in stages:
        variants = data.setdefault("variants", {})
        for spec in args.variant:
            label, methods, *rest = spec.split(":", 2)
            per_method = [s for s in (rest[0].split(",") if rest else []) if s]
            extra = [p.removeprefix("set=") for p in per_method if p.startswith("set=")]
            per_method = [p for p in per_method if not p.startswith("set=")]
            variants[label] = {"rows": compare(label, methods, runs / f"v-{label}", [*shared, *extra], per_method),
                               "command": command(methods, runs / f"v-{label}", [*shared, *extra], per_method)}
            save(out, data)

    for part in ("full_lr_sweep", "batchnorm", "table"):
        if part in data and (part in stages or args.stage == "report"):
            print(f"\n{part}:\n{markdown(data[part]['rows'])}")
    for label, v in data.get("variants", {}).items():
        if args.stage in ("variants", "report"):
            print(f"\nvariant {label}:\n{markdown(v['rows'])}")
    if args.stage == "report":
        return data
    data["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    save(out, data)
    return data


if __name__ == "__main__":
    main()
