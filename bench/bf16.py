"""``python -m bench.bf16``: the training step best against best, fp32 and bf16, with a small roofline.

Every setup runs in float32 and under bf16 autocast, all interleaved step by step in one process
(ABC..., then ...CBA; medians), on deep copies of the same model, batch and seed:

- ``full``: full fine-tuning; ``floor``: the frozen base with input gradients only (no adapter:
  the least any adapter can cost, ``bench/setups.py``);
- ``deltatune-lora`` and ``peft-lora``: rank 8, the workload's targets (``bench/setups.py``);
- in bf16, setups with a frozen base run twice more where it applies: ``+frozen16`` holds the
  frozen linear weights in bf16 once (``deltatune.core.frozen_dtype.FrozenInDtype``, what
  ``deltatune train`` does under bf16 by default) instead of letting autocast cast them each step.
  PEFT and the floor get the same treatment, so "best" is each one's fastest variant;
- ``bf16+fastdrop``: bf16 autocast with the model's own dropout (and attention dropout) drawing its
  masks as random bits (``deltatune.core.fast_dropout.FastDropout``, what ``deltatune train`` does by
  default: ``dropout_kernel: fast``). Every setup runs it, so like can be compared with like, but
  PEFT's *best* is taken over the variants a PEFT user has (not this one): dropout is the training
  loop's, and a PEFT run keeps torch's.

Best against best: each of deltatune, PEFT, full FT and the floor in its fastest variant, and the
ratios between those. Roofline: the step's matrix-multiply FLOPs are counted once per setup
(``torch.utils.flop_counter.FlopCounterMode``, with the fused kernels on torch's products so
every product is counted), and divided by the step time: achieved GFLOP/s, set against the
measured peak of ``F.linear`` in the same dtype over the model's own layer shapes (N = batch x
tokens rows; the best of those shapes, timed before and after the steps).

Writes ``bench/results/bf16-<workload>.json`` (``--out`` elsewhere).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from bench import measure, setups  # noqa: E402
from bench.workloads import WORKLOADS, Workload  # noqa: E402

LIBS = ["full", "floor", "deltatune-lora", "peft-lora"]


#: variants that a library's "best" is not taken over (``peft-lora``: a PEFT run keeps torch's dropout)
NOT_OFFERED = {"peft-lora": {"bf16+fastdrop"}}


def variants(libs: list[str]) -> list[tuple[str, str, str, bool, bool]]:
    """(label, setup, precision, frozen16, fastdrop) for every setup: fp32, bf16, bf16 with bf16 frozen
    weights, and bf16 with the fast dropout."""
    out = []
    for lib in libs:
        out.append((f"{lib} fp32", lib, "fp32", False, False))
        out.append((f"{lib} bf16", lib, "bf16", False, False))
        if lib != "full":  # full fine-tuning has no frozen weights
            out.append((f"{lib} bf16+frozen16", lib, "bf16", True, False))
        out.append((f"{lib} bf16+fastdrop", lib, "bf16", False, True))
    return out


def _step_fn(setup: setups.Setup, batch: dict[str, torch.Tensor], precision: str, frozen16: bool,
             fastdrop: bool = False):
    from deltatune.core.fast_dropout import FastDropout
    from deltatune.core.frozen_dtype import FrozenInDtype

    opt = setup.optimizer()
    frozen = FrozenInDtype(torch.bfloat16) if frozen16 else None

    def step() -> float:
        amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
        swap = frozen(setup.model) if frozen is not None else contextlib.nullcontext()
        drop = FastDropout() if fastdrop else contextlib.nullcontext()
        with setup.engine(), amp, swap, drop:
            loss = setup.model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def count_flops(step) -> int:
    """Matrix-multiply FLOPs of one step, every product on torch's kernels (so each is counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    from deltatune.core.products import cpu_engine

    with cpu_engine("aten"), FlopCounterMode(display=False) as counter:
        step()
    return int(counter.get_total_flops())


def linear_shapes(model: nn.Module) -> list[tuple[int, int]]:
    return sorted({(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)})


def matmul_peak(shapes: list[tuple[int, int]], rows: int, dtype: torch.dtype, reps: int = 3) -> dict[str, Any]:
    """GFLOP/s of ``F.linear`` (rows x d_in) x (d_out x d_in)ᵀ for each shape; best of ``reps`` each."""
    rates = {}
    for d_in, d_out in shapes:
        x = torch.randn(rows, d_in).to(dtype)
        w = torch.randn(d_out, d_in).to(dtype)
        F.linear(x, w)  # warm-up
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            F.linear(x, w)
            best = min(best, time.perf_counter() - t0)
        rates[f"{rows}x{d_in}x{d_out}"] = 2 * rows * d_in * d_out / best / 1e9
    return {"gflops": max(rates.values()), "per_shape": rates}


def run_workload(workload: Workload, libs: list[str], rounds: int,
                 only: list[str] | None = None) -> dict[str, Any]:
    base = workload.build()
    batch = workload.make_batch()
    rows = workload.batch * workload.length
    shapes = linear_shapes(base)
    peak_before = {d: matmul_peak(shapes, rows, getattr(torch, d)) for d in ("float32", "bfloat16")}
    steps: dict[str, Any] = {}
    info: dict[str, dict[str, Any]] = {}
    built: dict[str, setups.Setup] = {}
    for label, name, precision, frozen16, fastdrop in variants(libs):
        if only and label.split(" ", 1)[1] not in only:
            continue
        if name not in built:
            built[name] = setups.build(name, workload, base)
        # one model per setup; its variants share it (they only differ in how a step runs)
        steps[label] = _step_fn(built[name], batch, precision, frozen16, fastdrop)
        info[label] = {"setup": name, "precision": precision, "frozen16": frozen16, "fastdrop": fastdrop,
                       "flops": count_flops(steps[label])}   # also the first warm-up step
        steps[label]()                                        # second warm-up (optimizer state exists)
        print(f"  [{workload.name}] {label}: {info[label]['flops'] / 1e9:.1f} GFLOP per step", flush=True)
    times = measure.interleaved(steps, rounds=rounds, warmup=0)
    peak_after = {d: matmul_peak(shapes, rows, getattr(torch, d)) for d in ("float32", "bfloat16")}
    peak = {d: max(peak_before[d]["gflops"], peak_after[d]["gflops"]) for d in peak_before}
    for label, ts in times.items():
        r = info[label]
        r.update(step_s=measure.median(ts["wall"]), step_cpu_s=measure.median(ts["cpu"]),
                 step_all=ts["wall"], step_cpu_all=ts["cpu"])
        dtype = "bfloat16" if r["precision"] == "bf16" else "float32"
        r["gflops_achieved"] = r["flops"] / r["step_s"] / 1e9
        r["of_peak"] = r["gflops_achieved"] / peak[dtype]
    best = {}
    for lib in libs:
        mine = [label for label in info if info[label]["setup"] == lib
                and label.split(" ", 1)[1] not in NOT_OFFERED.get(lib, ())]
        if not mine:
            continue
        fastest = min(mine, key=lambda label: info[label]["step_s"])
        best[lib] = {"variant": fastest, "step_s": info[fastest]["step_s"]}
    del built, steps
    gc.collect()
    return {"name": workload.name, "batch": workload.batch, "length": workload.length, "setups": info,
            "best": best, "matmul_peak_gflops": peak, "matmul_peak_before": peak_before,
            "matmul_peak_after": peak_after}


def table(res: dict[str, Any]) -> str:
    info, best = res["setups"], res["best"]
    floor_best = best.get("floor", {}).get("step_s") or float("nan")
    peft_best = best.get("peft-lora", {}).get("step_s") or float("nan")
    lines = ["| setup | precision | step ms | GFLOP | GFLOP/s | % of matmul peak | vs PEFT best | vs floor best |",
             "|---|---|--:|--:|--:|--:|--:|--:|"]
    for label, r in info.items():
        bold = "**" if best[r["setup"]]["variant"] == label else ""
        variant = label.split(" ", 1)[1]
        lines.append(f"| {bold}{r['setup']}{bold} | {variant} | {r['step_s'] * 1000:.0f} | {r['flops'] / 1e9:.1f} | "
                     f"{r['gflops_achieved']:.0f} | {100 * r['of_peak']:.0f} % | "
                     f"{r['step_s'] / peft_best:.2f} | {r['step_s'] / floor_best:.2f} |")
    peak = res["matmul_peak_gflops"]
    lines.append(f"\nmatrix-multiply peak (F.linear over the model's layer shapes, best): "
                 f"float32 {peak['float32']:.0f} GFLOP/s, bfloat16 {peak['bfloat16']:.0f} GFLOP/s")
    like = [(info.get(f"deltatune-lora {v}"), info.get(f"peft-lora {v}")) for v in ("bf16", "bf16+fastdrop")]
    lines += [f"like with like ({a['precision']}{' + fast dropout' if a['fastdrop'] else ''}): deltatune-lora / "
              f"peft-lora {a['step_s'] / b['step_s']:.2f}" for a, b in like if a and b]
    lines.append("best against best: " + ", ".join(f"{lib} {b['step_s'] * 1000:.0f} ms ({b['variant'].split(' ', 1)[1]})"
                                                   for lib, b in best.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m bench.bf16", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", nargs="+", default=["minilm"], choices=sorted(WORKLOADS))
    p.add_argument("--setups", nargs="+", default=LIBS, choices=[*LIBS, "deltatune-lora-aten"],
                   help="deltatune-lora-aten: the fused kernel on torch's products only (the engine off)")
    p.add_argument("--variants", nargs="+", choices=["fp32", "bf16", "bf16+frozen16", "bf16+fastdrop"],
                   help="only these precisions (default: all)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, help="JSON (default bench/results/bf16-<workload>.json)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers.utils import logging

    logging.set_verbosity_error()
    results: dict[str, Any] = {}
    for key in args.workloads:
        load0 = os.getloadavg()
        print(f"bench.bf16 {key}: {torch.get_num_threads()} threads, load {load0[0]:.2f}", flush=True)
        res = run_workload(WORKLOADS[key], args.setups, args.rounds, args.variants)
        import peft
        import transformers

        res["machine"] = {
            "command": "python -m bench.bf16 " + " ".join(sys.argv[1:] if argv is None else argv),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "rounds": args.rounds,
            "loadavg_start": load0, "loadavg_end": os.getloadavg(),
        }
        print(f"\n{res['name']}, training step, batch {res['batch']} x {res['length']}\n" + table(res), flush=True)
        print(f"load average at start {load0[0]:.2f}, at end {os.getloadavg()[0]:.2f}", flush=True)
        out = args.out or Path(__file__).parent / "results" / f"bf16-{key}.json"
        if len(args.workloads) > 1 and args.out:
            out = args.out.with_name(f"{args.out.stem}-{key}{args.out.suffix}")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text(json.dumps(res, indent=1))
        tmp.replace(out)
        print(f"wrote {out}", flush=True)
        results[key] = res
    return results


if __name__ == "__main__":
    main()
