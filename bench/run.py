"""``python -m bench.run``: deltatune vs HF PEFT vs full fine-tuning, side by side, in one run.

Prints tables and writes JSON (default ``bench/results/latest.json``). For each workload:

- training: step time (setups interleaved, medians), peak tensor memory, RSS growth (fresh
  processes) for full fine-tuning and LoRA / DoRA / (IA)³ in deltatune and PEFT;
- inference: forward latency of the base model and of LoRA unmerged and merged;
- save / load time and adapter file size.

``--quick`` runs everything on tiny random-weight models in seconds (a smoke test: the figures
mean nothing). See ``bench/README.md`` for the latest figures and how they were measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

LORA = ["full", "floor", "deltatune-lora", "peft-lora", "deltatune-lora-thin"]
ALL = [*LORA, "deltatune-lora-aten", "deltatune-lora-onednn", "deltatune-dora", "peft-dora", "deltatune-ia3", "peft-ia3"]
# workload -> setups trained; DoRA and (IA)³ run on the small model only, to keep the run short.
PLAN = {"minilm": ALL, "smollm2": LORA, "tiny-bert": ALL, "tiny-llama": LORA}
# Fresh-process RSS runs cost a model load and two steps each: the goal-relevant setups, and by
# default on the small model only (--rss-all adds SmolLM2's).
RSS_SETUPS = ["full", "deltatune-lora", "peft-lora"]
RSS_WORKLOADS = ["minilm"]


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny random models, 2 rounds: a smoke test")
    p.add_argument("--workloads", nargs="+", choices=sorted(PLAN), help="default: minilm smollm2")
    p.add_argument("--sections", nargs="+", default=["train", "inference", "io"], choices=["train", "inference", "io"])
    p.add_argument("--rounds", type=int, help="timed rounds per setup (default 3, quick 1)")
    p.add_argument("--no-rss", action="store_true", help="skip the fresh-process RSS measurements")
    p.add_argument("--rss-all", action="store_true", help="RSS for every workload, not only minilm")
    p.add_argument("--checkpointing", action="store_true", help="train with gradient checkpointing")
    p.add_argument("--bf16", action="store_true", help="train under bf16 autocast (CPU or CUDA)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--out", type=Path, help="JSON output (default bench/results/latest.json)")
    args = p.parse_args(argv)
    args.workloads = args.workloads or (["tiny-bert", "tiny-llama"] if args.quick else ["minilm", "smollm2"])
    args.rounds = args.rounds or (1 if args.quick else 3)
    if args.out is None:
        args.out = (Path(tempfile.gettempdir()) / "deltatune-bench-quick.json" if args.quick
                    else Path(__file__).parent / "results" / "latest.json")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            p.error("--device cuda needs a CUDA build of torch and a GPU")
    return args


def machine(args: argparse.Namespace) -> dict[str, Any]:
    import peft
    import torch
    import transformers

    import deltatune

    return {
        "command": "python -m bench.run " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "peft": peft.__version__, "deltatune": deltatune.__version__,
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "device": args.device,
        "checkpointing": args.checkpointing, "bf16_autocast": args.bf16, "rounds": args.rounds,
        "loadavg_start": os.getloadavg(),
        "memory_method": ("tensor peak: live bytes of tensors created during the first two training steps "
                          "(TorchDispatchMode + storage finalisers); RSS+: VmHWM - VmRSS in a fresh process"
                          if args.device == "cpu" else "torch.cuda.max_memory_allocated over two steps"),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    import torch

    from bench import report, sections
    from bench.workloads import WORKLOADS

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.bf16:
        from bench import measure

        measure.AUTOCAST = torch.bfloat16
    results: dict[str, Any] = {"machine": machine(args)}
    print(f"deltatune bench on {args.device}, {torch.get_num_threads()} threads, "
          f"load {os.getloadavg()[0]:.2f}", flush=True)
    for key in args.workloads:
        workload = WORKLOADS[key]
        t0 = time.perf_counter()
        base = workload.build()
        res: dict[str, Any] = {"name": workload.name, "batch": workload.batch, "length": workload.length,
                               "load_s": time.perf_counter() - t0}
        results[key] = res
        if "train" in args.sections:
            rss = [] if args.no_rss or args.quick or (key not in RSS_WORKLOADS and not args.rss_all) else RSS_SETUPS
            res["train"] = sections.train(workload, key, base, PLAN[key], rounds=args.rounds, device=args.device,
                                          rss=rss, checkpointing=args.checkpointing, threads=args.threads)
            print(f"\n{workload.name}: training step, batch {workload.batch} x {workload.length}\n"
                  + report.train_table(res["train"]) + "\n", flush=True)
        if "inference" in args.sections:
            res["inference"] = sections.inference(workload, base, rounds=args.rounds, device=args.device)
            print(f"\n{workload.name}: inference (forward, batch {workload.batch} x {workload.length})\n"
                  + report.inference_table(res["inference"]) + "\n", flush=True)
        if "io" in args.sections:
            res["io"] = sections.save_load(workload, base, rounds=args.rounds)
            print(f"\n{workload.name}: LoRA adapter save / load (onto a fresh base)\n"
                  + report.io_table(res["io"]) + "\n", flush=True)
        del base
    results["machine"]["loadavg_end"] = os.getloadavg()
    results["goals"] = report.check_goals(results, quick=args.quick)
    if results["goals"]:
        print("Goals (issue 7), ratios from this run:\n" + report.goals_table(results["goals"]))
        print("\n".join(["Floor (the least any adapter can cost):", *report.floor_lines(results)]))
    load = results["machine"]
    print(f"\nload average at start {load['loadavg_start'][0]:.2f}, at end {load['loadavg_end'][0]:.2f} "
          f"on {load['cores']} cores")
    print(f"memory: {load['memory_method']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
