"""Quantized frozen base on a chosen device (``--device cpu|cuda``): time and memory, side by side.

    python -m bench.quant_device --device cuda --out /tmp/gpuout/quant-cuda.json
    python -m bench.quant_device --device cpu --quick --out /tmp/quant-cpu.json   # the same code, tiny models

bench/quant.py is the CPU bench (RSS, task quality, kernel levers); this one is the same comparison
made for an accelerator: every setup is built, quantized and trained on ``--device``, and each
figure is one that means the same on CPU and CUDA. Per model (all-MiniLM-L6-v2 batch 32 x 128;
SmolLM2-135M batch 1 x 256, gradient checkpointing, loss in chunks of 256 tokens) and setup:

- ``resident_bytes``: bytes of the frozen model's tensors on the device (parameters, buffers,
  quantization state such as NF4 scales; the adapter's own tensors not counted);
  ``linear_bytes`` the same for the quantizable linear layers alone;
- ``peak_bytes``: peak memory of two training steps from a fresh optimizer, weights included. CUDA:
  ``torch.cuda.max_memory_allocated`` during the steps minus what was allocated before this setup
  was built (other setups' models stay resident for the interleaved timing). CPU: ``resident_bytes``
  plus the adapter plus bench/measure.py's tensor peak of the steps (no allocator on the CPU to ask);
- ``step_s``: median seconds of one training step, every setup taking turns (interleaved rounds,
  ``torch.cuda.synchronize`` around each step; ``--rounds`` at most, fewer where a timed warm-up round
  says the phase would exceed ``--phase-s``); ``step_large_s`` the same at a larger batch (``--large``,
  default 16 x 256 / 128 x 128 on CUDA), so that the step is not bound by kernel launches.

Setups (LoRA rank 8 on the attention and MLP linears, α 16): ``fp32``; ``bf16`` (the whole model in
bfloat16); ``int8`` (bitsandbytes LLM.int8 weights, threshold 0); ``nf4`` (bitsandbytes NF4, double
quantization, float32 compute); ``nf4-bf16`` (the same, bfloat16 compute, the rest of the model in
bfloat16: QLoRA's GPU recipe); ``nf4-torchao`` and ``nf4-torchao-bf16`` (torchao's NF4 tensor);
``peft-nf4`` and ``peft-nf4-bf16`` (Hugging Face PEFT's LoRA on the same bitsandbytes NF4 base). A
setup that fails is recorded with its error, not hidden. The JSON is rewritten after every figure, so
a run cut short keeps what it measured; ``--budget-s`` stops starting new work after that many seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import deltatune as dt
from bench.measure import interleaved, median, tensor_peak
from bench.quant_common import frozen_bytes, linear_bytes, versions, workload
from bench.workloads import Workload
from deltatune.train.memory import chunked_runner

# bitsandbytes logs a warning on every int8 forward of float32 inputs on CUDA ("cast to float16")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

#: setup -> (storage format, backend, bfloat16 compute and rest, PEFT's LoRA instead of deltatune's)
SETUPS: dict[str, tuple[str, str, bool, bool]] = {
    "fp32": ("none", "", False, False),
    "bf16": ("none", "", True, False),
    "int8": ("int8", "bitsandbytes", False, False),
    "nf4": ("nf4", "bitsandbytes", False, False),
    "nf4-bf16": ("nf4", "bitsandbytes", True, False),
    "nf4-torchao": ("nf4", "torchao", False, False),
    "nf4-torchao-bf16": ("nf4", "torchao", True, False),
    "peft-nf4": ("nf4", "bitsandbytes", False, True),
    "peft-nf4-bf16": ("nf4", "bitsandbytes", True, True),
}
#: goal rows: (figure, setup, reference setup, limit)
GOALS = [("resident_bytes", "nf4", "fp32", 0.3), ("resident_bytes", "int8", "fp32", 0.55),
         ("peak_bytes", "nf4", "fp32", 0.5), ("peak_bytes", "nf4-bf16", "fp32", 0.5),
         ("step_s", "nf4", "fp32", 1.3), ("step_s", "nf4-bf16", "bf16", 1.3), ("step_s", "nf4", "peft-nf4", 1.0),
         ("step_s", "nf4-bf16", "peft-nf4-bf16", 1.0), ("step_large_s", "nf4", "fp32", 1.3),
         ("step_large_s", "nf4-bf16", "bf16", 1.3), ("step_large_s", "nf4", "peft-nf4", 1.0),
         ("step_large_s", "nf4-bf16", "peft-nf4-bf16", 1.0)]


def build(setup: str, w: Workload, device: torch.device) -> nn.Module:
    """``w``'s model in ``setup``'s storage on ``device``, LoRA attached, in training mode."""
    fmt, backend, bf16, peft = SETUPS[setup]
    model = w.build()
    if fmt == "none":
        model.to(device=device, dtype=torch.bfloat16 if bf16 else None)
    else:  # each linear layer moves to the device and is quantized there; the rest follows
        dt.quantize(model, fmt, backend=backend, device=device, compute_dtype=torch.bfloat16 if bf16 else torch.float32,
                    rest_dtype=torch.bfloat16 if bf16 else None)
    if peft:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=w.lora_target,
                                                 modules_to_save=w.head or None))
    else:
        dt.attach(model, dt.LoraConfig(target=w.lora_target, rank=8, alpha=16, modules_to_save=tuple(w.head)))
    if w.causal:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model.train()


def stepper(model: nn.Module, w: Workload, device: torch.device) -> Callable[[dict[str, torch.Tensor]], float]:
    """A fresh AdamW over the trainable parameters and a step function taking a batch."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    run = chunked_runner(lambda m, b: m(**b), 256) if w.causal else (lambda m, b: m(**b))

    def step(batch: dict[str, torch.Tensor]) -> float:
        loss = run(model, batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())  # also waits for the device
    return step


def peak_of_steps(step: Callable[[], Any], device: torch.device, before: int, resident: int) -> int:
    """Peak bytes of two steps, weights included (see the module docs for what each device counts)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    return resident + tensor_peak(step)["peak"]


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


class Recorder:
    """The results so far, rewritten to ``path`` (atomically) after every figure."""

    def __init__(self, path: Path, head: dict[str, Any]) -> None:
        self.path, self.data = path, {**head, "models": {}}
        path.parent.mkdir(parents=True, exist_ok=True)

    def save(self) -> None:
        tmp = self.path.with_name(self.path.name + ".partial")
        tmp.write_text(json.dumps(self.data, indent=2) + "\n")
        tmp.replace(self.path)


def run_model(name: str, w: Workload, large: Workload | None, setups: list[str], device: torch.device,
              rounds: int, rec: Recorder, over: Callable[[], bool], phase_s: float) -> None:
    block = rec.data["models"][name] = {
        "workload": {"model": w.name, "batch": w.batch, "length": w.length, "gradient_checkpointing": w.causal,
                     "loss_chunk": 256 if w.causal else None, "rounds": rounds,
                     "large_batch": None if large is None else large.batch},
        "setups": {}}
    rows: dict[str, dict[str, Any]] = block["setups"]
    batch = w.make_batch(device=str(device))
    steps: dict[str, Callable[[dict[str, torch.Tensor]], float]] = {}
    for setup in setups:
        if over():
            rows[setup] = {"error": "not run: --budget-s reached"}
            continue
        before = allocated(device)
        t0 = time.perf_counter()
        try:
            model = build(setup, w, device)
            step = stepper(model, w, device)
            step(batch)  # warm-up: libraries build state (and CUDA its kernels) on the first call
        except Exception as e:  # recorded, not hidden (e.g. a backend that cannot run on this device)
            rows[setup] = {"error": f"{type(e).__name__}: {e}"[:300]}
            rec.save()
            print(f"{name} {setup}: {rows[setup]['error']}", flush=True)
            gc.collect()
            continue
        build_s = time.perf_counter() - t0
        resident = frozen_bytes(model)
        step = stepper(model, w, device)  # a fresh optimizer: the peak's second step holds its state
        peak = peak_of_steps(lambda: step(batch), device, before, resident)
        rows[setup] = {"resident_bytes": resident, "linear_bytes": None if SETUPS[setup][3] else linear_bytes(model),
                       "peak_bytes": peak, "build_s": round(build_s, 2)}
        steps[setup] = step
        rec.save()
        print(f"{name} {setup}: resident {resident / 2**20:.1f} MiB, peak {peak / 2**20:.1f} MiB, "
              f"built in {build_s:.1f}s", flush=True)
    big = None if large is None else large.make_batch(device=str(device))
    for key, b in (("step_s", batch), ("step_large_s", big)):
        if b is None or not steps or over():
            continue
        fns = {s: (lambda f=f, b=b: f(b)) for s, f in steps.items()}
        one = sum(_timed(f, device) for f in fns.values())  # a warm-up round, timed: seconds per round
        n = min(rounds, max(3, int(phase_s / max(one, 1e-9))))  # ~phase_s of timing, 3 rounds at least (if asked)
        times = interleaved(fns, rounds=n, warmup=0, device=str(device))
        for setup, t in times.items():
            rows[setup][key] = median(t["wall"])
        block["workload"][f"{key}_rounds"] = n
        rec.save()
    for setup, row in rows.items():
        row["ratios"] = {f"{k}/{ref}": row[k] / rows[ref][k] for k in ("resident_bytes", "peak_bytes", "step_s",
                                                                        "step_large_s")
                         for ref in ("fp32", "bf16") if row.get(k) and rows.get(ref, {}).get(k)}
    block["goals"] = goals(rows)
    rec.save()
    steps.clear()


def goals(rows: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for key, setup, ref, limit in GOALS:
        a, b = rows.get(setup, {}).get(key), rows.get(ref, {}).get(key)
        if a and b:
            out.append({"figure": key, "setup": setup, "vs": ref, "ratio": a / b, "limit": limit,
                        "met": a / b <= limit})
    return out


def summary(data: dict[str, Any]) -> str:
    lines = []
    for name, block in data["models"].items():
        lines.append(f"\n{name} {block['workload']}")
        lines.append(f"  {'setup':17s} {'resident MiB':>12s} {'peak MiB':>9s} {'step ms':>8s} {'large ms':>9s}")
        for setup, row in block["setups"].items():
            if "error" in row:
                lines.append(f"  {setup:17s} {row['error'][:100]}")
                continue
            ms = lambda k: f"{row[k] * 1e3:8.1f}" if row.get(k) else "       -"  # noqa: E731
            lines.append(f"  {setup:17s} {row['resident_bytes'] / 2**20:12.1f} {row['peak_bytes'] / 2**20:9.1f} "
                         f"{ms('step_s')} {ms('step_large_s'):>9s}")
        for g in block.get("goals", []):
            lines.append(f"  goal {g['figure']} {g['setup']}/{g['vs']} = {g['ratio']:.2f}x "
                         f"(<= {g['limit']}): {'met' if g['met'] else 'NOT met'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", help="cpu or cuda (the same code path on both)")
    p.add_argument("--out", type=Path, required=True, help="the JSON file (rewritten as results come in)")
    p.add_argument("--quick", action="store_true", help="tiny random models (an end-to-end check of this script)")
    p.add_argument("--models", default="smollm2,minilm", help="in this order (the goal rows are SmolLM2's)")
    p.add_argument("--setups", default=",".join(SETUPS))
    p.add_argument("--rounds", type=int, default=10, help="interleaved timing rounds, at most")
    p.add_argument("--phase-s", type=float, default=8.0,
                   help="fewer rounds (3 at least) where one timing phase would take longer than this")
    p.add_argument("--large", type=int, default=-1,
                   help="the larger timing batch, SmolLM2 rows (MiniLM: 8x that); 0: none; -1: 16 on CUDA, none on CPU")
    p.add_argument("--budget-s", type=float, default=0, help="start no new setup or timing after this (0: no limit)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: torch {torch.__version__} sees no CUDA device here")
    setups = args.setups.split(",")
    unknown = [s for s in setups if s not in SETUPS]
    if unknown:
        raise SystemExit(f"unknown setup {unknown[0]!r}; choose from {', '.join(SETUPS)}")
    start = time.perf_counter()
    over = lambda: bool(args.budget_s) and time.perf_counter() - start > args.budget_s  # noqa: E731
    large = args.large if args.large >= 0 else (16 if device.type == "cuda" else 0)
    info = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        # the cuBLAS workspace is allocated on the first matmul and kept: paid here, not by the first setup
        (torch.ones(64, 64, device=device) @ torch.ones(64, 64, device=device)).sum().item()
    rec = Recorder(args.out, {"machine": info, "versions": versions(), "weights": "random twins on the GPU: "
                              "time and memory only", "setups": {k: list(v) for k, v in SETUPS.items() if k in setups}})
    torch.manual_seed(0)
    for name in args.models.split(","):
        w = workload(name, args.quick)
        big = None
        if large:
            big = dataclasses.replace(w, batch=large * (8 if name == "minilm" else 1))
        run_model(name, w, big, setups, device, args.rounds, rec, over, args.phase_s)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    rec.data["wall_s"] = round(time.perf_counter() - start, 1)
    rec.save()
    print(summary(rec.data))
    print(f"wrote {args.out} in {rec.data['wall_s']}s")


if __name__ == "__main__":
    main()
