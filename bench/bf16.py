"""``python -m bench.bf16``: the training step best against best, fp32 and bf16, with a small roofline.

Every setup runs in every precision variant of the device, all interleaved step by step in one
process (ABC..., then ...CBA; medians), on deep copies of the same model, batch and seed:

- ``full``: full fine-tuning; ``floor``: the frozen base with input gradients only (no adapter:
  the least any adapter can cost, ``bench/setups.py``);
- ``deltatune-lora`` and ``peft-lora``: rank 8, the workload's targets (``bench/setups.py``);
  deltatune on its default engine;
- variants: ``fp32``; ``bf16`` (autocast); ``bf16+frozen16``: bf16 autocast with the frozen linear
  weights held in bf16 once (``deltatune.core.frozen_dtype.FrozenInDtype``, ``frozen_dtype:
  bfloat16`` in ``deltatune train``) instead of cast by autocast each step; setups with a frozen
  base only, PEFT and the floor included, so "best" is each one's fastest variant;
- CPU only, ``bf16+fastdrop``: bf16 autocast with the model's own dropout (and attention dropout)
  drawing its masks as random bits (``deltatune.core.fast_dropout.FastDropout``, what ``deltatune
  train`` does by default on a CPU). Every setup runs it, so like can be compared with like, but
  PEFT's *best* is taken over the variants a PEFT user has (not this one). On CUDA the mode does
  nothing (torch's fused dropout runs), so the variant is not run there;
- CUDA only, ``tf32``: float32 with TensorFloat-32 products (``torch.set_float32_matmul_precision
  ("high")`` over forward, backward and the optimizer step); ``fp32`` is the IEEE ``"highest"``.

Best against best: each of deltatune, PEFT, full FT and the floor in its fastest variant, and the
ratios between those (``ratios``); deltatune's LoRA step against the floor, also variant by
variant (``lora_vs_floor``): that gap is the most any faster LoRA kernel could win. Roofline: the
step's matrix-multiply FLOPs are counted once per setup (``torch.utils.flop_counter.FlopCounterMode``,
with the fused kernels on torch's products so every product is counted), and divided by the step
time: achieved GFLOP/s, set against the measured peak of ``F.linear`` in the same dtype (float32,
TF32 on CUDA, bfloat16) over the model's own layer shapes (N = batch x tokens rows; the best of
those shapes, timed before and after the steps, after only within ``--budget-s``; on CUDA the
products are queued behind a sleep kernel and timed with CUDA events, so launch latency is not
counted). Memory: the peak a training
step adds on top of the loaded model over the first two steps from a fresh optimizer (its state
included): ``torch.cuda.max_memory_allocated`` on CUDA, the tensor peak of ``bench/measure.py``
on CPU.

``--device cuda`` runs the same code on the GPU (step times with ``torch.cuda.synchronize`` and
CUDA events around ``--steps-per-round`` steps). ``--sizes`` picks the batches: ``default`` is the
workload's own (MiniLM 32 x 128, SmolLM2 4 x 256: CPU-sized, launch-bound on a large GPU), ``gpu``
a GPU-sized one per workload (``GPU_SIZES``), ``BxT`` any. ``--budget-s`` stops timing rounds and
skips the runs not yet started once that many seconds have passed (each run keeps at least two
rounds), so a section with a time allotment ends with results.

Writes ``bench/results/bf16-<workload>.json`` (``--out`` elsewhere; with several runs and ``--out``
one file holding every run under ``runs``), rewritten as results come in, so a killed run leaves
what it had.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from bench import measure, setups  # noqa: E402
from bench.measure import write_json  # noqa: E402
from bench.roofline import Clock, count_flops, linear_shapes, matmul_precision, peaks, time_rounds  # noqa: E402
from bench.workloads import WORKLOADS, Workload  # noqa: E402

LIBS = ["full", "floor", "deltatune-lora", "peft-lora"]

#: variant -> (precision: "fp32" | "tf32" | "bf16", frozen16, fastdrop)
VARIANTS: dict[str, tuple[str, bool, bool]] = {
    "fp32": ("fp32", False, False),
    "tf32": ("tf32", False, False),
    "bf16": ("bf16", False, False),
    "bf16+frozen16": ("bf16", True, False),
    "bf16+fastdrop": ("bf16", False, True),
}
DEVICE_VARIANTS = {"cpu": ["fp32", "bf16", "bf16+frozen16", "bf16+fastdrop"],
                   "cuda": ["fp32", "tf32", "bf16", "bf16+frozen16"]}
#: the dtype whose matmul peak a precision is set against
PEAK_DTYPE = {"fp32": "float32", "tf32": "tf32", "bf16": "bfloat16"}

#: variants that a library's "best" is not taken over (``peft-lora``: a PEFT run keeps torch's dropout)
NOT_OFFERED = {"peft-lora": {"bf16+fastdrop"}}

#: batch x tokens per workload for ``--sizes gpu``: a step of a few ms or more on an H200 (the
#: workloads' own batches are sized for a 2-core CPU and are launch-bound there)
GPU_SIZES = {"minilm": (256, 128), "smollm2": (16, 512), "tiny-bert": (8, 32), "tiny-llama": (4, 32)}


def variants(libs: list[str], allowed: list[str]) -> list[tuple[str, str, str]]:
    """(label, setup, variant) for every setup and variant (full fine-tuning has no frozen weights)."""
    return [(f"{lib} {v}", lib, v) for lib in libs for v in allowed
            if not (lib == "full" and VARIANTS[v][1])]


def _step_fn(setup: setups.Setup, batch: dict[str, torch.Tensor], variant: str, device: str) -> Callable[[], Any]:
    from deltatune.core.fast_dropout import FastDropout
    from deltatune.core.frozen_dtype import FrozenInDtype

    precision, frozen16, fastdrop = VARIANTS[variant]
    opt = setup.optimizer()
    frozen = FrozenInDtype(torch.bfloat16) if frozen16 else None

    def step() -> torch.Tensor:
        # no .item(): on CUDA the caller synchronises, so steps can queue like a training loop's
        amp = torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16")
        swap = frozen(setup.model) if frozen is not None else contextlib.nullcontext()
        drop = FastDropout() if fastdrop else contextlib.nullcontext()
        with matmul_precision(precision):
            with setup.engine(), amp, swap, drop:
                loss = setup.model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def first_steps(step: Callable[[], Any], device: str, flops: int | None = None) -> dict[str, int]:
    """The memory the first two steps add on top of what is resident (fresh optimizer: its state is
    created here), peak and what stays after; and the first step's FLOPs unless ``flops`` is known
    (a setup's variants run the same products, so they are counted once per setup)."""
    def two() -> int:
        n = count_flops(step) if flops is None else (step(), flops)[1]
        step()
        return n

    if device == "cuda":
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        n = two()
        torch.cuda.synchronize()
        return {"flops": n, "peak_bytes": torch.cuda.max_memory_allocated() - start,
                "after_bytes": torch.cuda.memory_allocated() - start}
    with measure.TensorPeak() as tracker:
        n = two()
    return {"flops": n, "peak_bytes": tracker.peak, "after_bytes": tracker.current}


def summarise(res: dict[str, Any], libs: list[str]) -> None:
    """Fill in achieved GFLOP/s, shares of the peak, each library's best and the ratios (in place)."""
    info, peak = res["setups"], res.get("matmul_peak_gflops") or {}
    for r in info.values():
        if "step_s" not in r:
            continue
        r["gflops_achieved"] = r["flops"] / r["step_s"] / 1e9
        p = peak.get(PEAK_DTYPE[r["precision"]])
        r["of_peak"] = r["gflops_achieved"] / p if p else None
    best = {}
    for lib in libs:
        mine = [label for label, r in info.items() if r["setup"] == lib and "step_s" in r
                and label.split(" ", 1)[1] not in NOT_OFFERED.get(lib, ())]
        if mine:
            fastest = min(mine, key=lambda label: info[label]["step_s"])
            best[lib] = {"variant": fastest, "step_s": info[fastest]["step_s"]}
    res["best"] = best

    def ratio(a: str, b: str) -> float | None:
        return best[a]["step_s"] / best[b]["step_s"] if a in best and b in best else None

    res["ratios"] = {"deltatune_vs_peft": ratio("deltatune-lora", "peft-lora"),
                     "deltatune_vs_floor": ratio("deltatune-lora", "floor"),
                     "deltatune_vs_full": ratio("deltatune-lora", "full"),
                     "peft_vs_floor": ratio("peft-lora", "floor"),
                     "peft_vs_full": ratio("peft-lora", "full")}
    if "deltatune-lora" in best and "floor" in best:
        res["ratios"]["deltatune_minus_floor_ms"] = 1e3 * (best["deltatune-lora"]["step_s"] - best["floor"]["step_s"])
    res["lora_vs_floor"] = {}   # variant by variant: the most a faster LoRA kernel could win there
    res["like_with_like"] = {}  # deltatune-lora / peft-lora, same variant
    for label, r in info.items():
        if r["setup"] != "deltatune-lora" or "step_s" not in r:
            continue
        v = label.split(" ", 1)[1]
        floor, peft_ = info.get(f"floor {v}", {}), info.get(f"peft-lora {v}", {})
        if "step_s" in floor:
            res["lora_vs_floor"][v] = {"ratio": r["step_s"] / floor["step_s"],
                                       "gap_ms": 1e3 * (r["step_s"] - floor["step_s"])}
        if "step_s" in peft_:
            res["like_with_like"][v] = r["step_s"] / peft_["step_s"]


def run_workload(workload: Workload, libs: list[str], rounds: int, only: list[str] | None = None, *,
                 device: str = "cpu", base: nn.Module | None = None, per_round: int = 1,
                 clock: Clock | None = None, save: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    clock = clock or Clock(None)
    save = save or (lambda res: None)
    if base is None:
        base = workload.build().to(device)
    batch = workload.make_batch(device=device)
    rows = workload.batch * workload.length
    shapes = linear_shapes(base)
    res: dict[str, Any] = {"name": workload.name, "batch": workload.batch, "length": workload.length,
                           "device": device, "setups": {}, "partial": True}
    info = res["setups"]
    res["matmul_peak_before"] = peak_before = peaks(shapes, rows, device)
    res["matmul_peak_gflops"] = {d: p["gflops"] for d, p in peak_before.items()}
    save(res)
    steps: dict[str, Any] = {}
    built: dict[str, setups.Setup] = {}
    for label, name, variant in variants(libs, only or DEVICE_VARIANTS[device]):
        if name not in built:
            built[name] = setups.build(name, workload, base)
        # one model per setup; its variants share it (they only differ in how a step runs)
        steps[label] = _step_fn(built[name], batch, variant, device)
        precision, frozen16, fastdrop = VARIANTS[variant]
        known = next((r["flops"] for r in info.values() if r["setup"] == name), None)
        info[label] = {"setup": name, "variant": variant, "precision": precision, "frozen16": frozen16,
                       "fastdrop": fastdrop, **first_steps(steps[label], device, known)}  # the two warm-up steps
        print(f"  [{workload.name} {workload.batch}x{workload.length}] {label}: "
              f"{info[label]['flops'] / 1e9:.1f} GFLOP per step, peak +{info[label]['peak_bytes'] / 2**20:.0f} MiB "
              f"({clock.elapsed():.0f} s)", flush=True)
        save(res)

    def on_round(times: dict[str, dict[str, list[float]]]) -> None:
        for label, ts in times.items():
            r = info[label]
            r.update(step_s=measure.median(ts["wall"]), step_cpu_s=measure.median(ts["cpu"]),
                     step_all=ts["wall"], step_cpu_all=ts["cpu"], rounds_done=len(ts["wall"]))
            if ts["gpu"]:
                r.update(step_gpu_s=measure.median(ts["gpu"]), step_gpu_all=ts["gpu"])
        summarise(res, libs)
        save(res)

    time_rounds(steps, rounds, per_round, device, clock, on_round)
    if not clock.over():  # past the budget the peak taken before the steps has to do
        res["matmul_peak_after"] = peak_after = peaks(shapes, rows, device)
        res["matmul_peak_gflops"] = {d: max(peak_before[d]["gflops"], peak_after[d]["gflops"]) for d in peak_before}
    summarise(res, libs)
    res["partial"] = False
    save(res)
    del built, steps
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return res


def table(res: dict[str, Any]) -> str:
    info, best = res["setups"], res["best"]
    floor_best = best.get("floor", {}).get("step_s") or float("nan")
    peft_best = best.get("peft-lora", {}).get("step_s") or float("nan")
    other = "GPU ms" if res.get("device") == "cuda" else "CPU ms"
    lines = [f"| setup | variant | step ms | {other} | GFLOP | GFLOP/s | % of matmul peak | peak MiB | "
             "vs PEFT best | vs floor best |", "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for label, r in info.items():
        if "step_s" not in r:
            continue
        bold = "**" if best.get(r["setup"], {}).get("variant") == label else ""
        second = r.get("step_gpu_s", r["step_cpu_s"])
        share = "" if r.get("of_peak") is None else f"{100 * r['of_peak']:.0f} %"
        lines.append(f"| {bold}{r['setup']}{bold} | {r['variant']} | {r['step_s'] * 1000:.1f} | {second * 1000:.1f} | "
                     f"{r['flops'] / 1e9:.1f} | {r['gflops_achieved']:.0f} | {share} | {r['peak_bytes'] / 2**20:.0f} | "
                     f"{r['step_s'] / peft_best:.2f} | {r['step_s'] / floor_best:.2f} |")
    peak = res["matmul_peak_gflops"]
    lines.append("\nmatrix-multiply peak (F.linear over the model's layer shapes, best): "
                 + ", ".join(f"{d} {g:.0f} GFLOP/s" for d, g in peak.items()))
    lines += [f"like with like ({v}): deltatune-lora / peft-lora {x:.2f}" for v, x in res["like_with_like"].items()]
    lines += [f"deltatune-lora vs floor ({v}): {x['ratio']:.2f}x, {x['gap_ms']:+.1f} ms a step"
              for v, x in res["lora_vs_floor"].items()]
    lines.append("best against best: " + ", ".join(f"{lib} {b['step_s'] * 1000:.1f} ms ({b['variant'].split(' ', 1)[1]})"
                                                   for lib, b in best.items()))
    return "\n".join(lines)


def summary(runs: list[dict[str, Any]]) -> str:
    """One line per run: each library's best, and deltatune's ratios and gap to the floor."""
    lines = ["| model | batch | full | floor | deltatune-lora | peft-lora | dt / PEFT | dt / floor | dt - floor ms "
             "| dt % of peak |", "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for res in runs:
        best, ratios = res.get("best", {}), res.get("ratios", {})

        def cell(lib: str) -> str:
            b = best.get(lib)
            return f"{b['step_s'] * 1e3:.1f} ({b['variant'].split(' ', 1)[1]})" if b else "-"

        def num(key: str, fmt: str) -> str:
            return format(ratios[key], fmt) if ratios.get(key) is not None else "-"

        dt = res["setups"].get(best.get("deltatune-lora", {}).get("variant", ""), {})
        share = f"{100 * dt['of_peak']:.0f} %" if dt.get("of_peak") is not None else "-"
        lines.append(f"| {res['name']} | {res['batch']}x{res['length']} | {cell('full')} | {cell('floor')} | "
                     f"{cell('deltatune-lora')} | {cell('peft-lora')} | {num('deltatune_vs_peft', '.2f')} | "
                     f"{num('deltatune_vs_floor', '.2f')} | {num('deltatune_minus_floor_ms', '+.1f')} | {share} |")
    return "\n".join(lines)


def parse_sizes(items: list[str], key: str, workload: Workload) -> list[tuple[int, int]]:
    out = []
    for item in items:
        if item == "default":
            size = (workload.batch, workload.length)
        elif item == "gpu":
            size = GPU_SIZES[key]
        else:
            try:
                b, t = (int(v) for v in item.lower().split("x"))
            except ValueError:
                raise SystemExit(f"error: --sizes takes 'default', 'gpu' or BxT such as 256x128, got {item!r}") from None
            size = (b, t)
        if size not in out:
            out.append(size)
    return out


def machine(args: argparse.Namespace, argv: list[str] | None, load0: tuple[float, ...]) -> dict[str, Any]:
    import peft
    import transformers

    info = {
        "command": "python -m bench.bf16 " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "python": platform.python_version(),
        "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "rounds": args.rounds, "steps_per_round": args.steps_per_round,
        "device": args.device, "loadavg_start": load0, "loadavg_end": os.getloadavg(),
    }
    if args.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), cuda=torch.version.cuda,
                    capability=list(torch.cuda.get_device_capability(0)), gpu_memory_bytes=props.total_memory)
    return info


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m bench.bf16", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", nargs="+", default=["minilm"], choices=sorted(WORKLOADS))
    p.add_argument("--setups", nargs="+", default=LIBS, choices=[*LIBS, "deltatune-lora-aten"],
                   help="deltatune-lora-aten: the fused kernel on torch's products only (the engine off)")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS),
                   help="only these variants (default: all the device has: " +
                        "; ".join(f"{d}: {' '.join(v)}" for d, v in DEVICE_VARIANTS.items()) + ")")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--sizes", nargs="+", default=["default"],
                   help="batches: 'default' (the workload's), 'gpu' (GPU_SIZES) or BxT, e.g. 256x128")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps-per-round", type=int, default=1, help="steps a setup runs back to back per turn")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (--device cpu only)")
    p.add_argument("--budget-s", type=float, help="stop timing and skip runs not started after this many seconds")
    p.add_argument("--out", type=Path, help="JSON (default bench/results/bf16-<workload>.json)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no GPU here; use --device cpu")
    bad = [v for v in args.variants or [] if v not in DEVICE_VARIANTS[args.device]]
    if bad:
        raise SystemExit(f"error: variant(s) {', '.join(bad)} do not run on {args.device}; "
                         f"choose from {', '.join(DEVICE_VARIANTS[args.device])}")
    sizes = {key: parse_sizes(args.sizes, key, WORKLOADS[key]) for key in args.workloads}
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    from transformers.utils import logging

    logging.set_verbosity_error()
    clock = Clock(args.budget_s)
    load0 = os.getloadavg()
    n_runs = sum(len(v) for v in sizes.values())
    combined = args.out is not None and n_runs > 1
    runs: list[dict[str, Any]] = []
    skipped: list[str] = []
    results: dict[str, Any] = {}

    def out_path(key: str, b: int, t: int, default: bool) -> Path:
        if args.out is not None:
            return args.out
        tail = ("" if default else f"-{b}x{t}") + ("-cuda" if args.device == "cuda" else "")
        return Path(__file__).parent / "results" / f"bf16-{key}{tail}.json"

    def save_all(current: dict[str, Any] | None, path: Path) -> None:
        mach = machine(args, argv, load0)
        if combined:
            done = runs + ([current] if current is not None and all(current is not r for r in runs) else [])
            write_json(path, {"machine": mach, "runs": done, "skipped": skipped, "elapsed_s": clock.elapsed()})
        elif current is not None:
            write_json(path, {**current, "machine": mach})

    for key in args.workloads:
        if clock.over():
            skipped += [f"{key} {b}x{t}" for b, t in sizes[key]]
            continue
        print(f"bench.bf16 {key} on {args.device}: {torch.get_num_threads()} CPU threads, load {load0[0]:.2f}",
              flush=True)
        base = WORKLOADS[key].build().to(args.device)
        for b, t in sizes[key]:
            if clock.over():
                skipped.append(f"{key} {b}x{t}")
                print(f"  skipped {key} {b}x{t}: past --budget-s {args.budget_s:g}", flush=True)
                continue
            workload = dataclasses.replace(WORKLOADS[key], batch=b, length=t)
            default = (b, t) == (WORKLOADS[key].batch, WORKLOADS[key].length)
            path = out_path(key, b, t, default)
            res = run_workload(workload, args.setups, args.rounds, args.variants, device=args.device, base=base,
                               per_round=args.steps_per_round, clock=clock,
                               save=lambda r, path=path: save_all(r, path))
            res["machine"] = machine(args, argv, load0)
            runs.append(res)
            save_all(res, path)
            print(f"\n{res['name']}, training step on {args.device}, batch {b} x {t}\n" + table(res), flush=True)
            print(f"wrote {path} ({clock.elapsed():.0f} s)", flush=True)
            results[key if default and key not in results else f"{key} {b}x{t}"] = res
        del base
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
    if combined and not runs:
        save_all(None, args.out)
    print(f"\nbest against best, {args.device} ({clock.elapsed():.0f} s; load average at start {load0[0]:.2f}, "
          f"at end {os.getloadavg()[0]:.2f})\n" + summary(runs), flush=True)
    if skipped:
        print("skipped (past --budget-s): " + ", ".join(skipped), flush=True)
    return results


if __name__ == "__main__":
    main()
