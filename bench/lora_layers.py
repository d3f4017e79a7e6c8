"""``python -m bench.lora_layers``: one LoRA layer under bf16 autocast, forward and backward timed apart.

The question it answers (issue 20): at a workload's own layer shapes, does deltatune's fused LoRA
kernel lose to the plain formula on this CPU, and if so in which direction? Four ways to compute
``y = x Wᵀ + b + s·(x Aᵀ) Bᵀ`` (rank 8, s = 2, W frozen, A and B trained, x needing a gradient):

- ``merged``: the fused kernel with one product by ``W + s·B A`` (``methods/lora_kernels.py``,
  what ``merge_pays`` picks for long batches), forward and input gradient;
- ``plain``: the fused kernel with the base product and an in-place rank-r update;
- ``formula``: autograd on ``F.linear(x, W, b) + F.linear(F.linear(x, A), B) * s``: PEFT's formula,
  without PEFT's module plumbing or its cast of a bf16 input to float32;
- ``floor``: ``F.linear(x, W, b)`` alone, the frozen layer with its input gradient (no adapter).

Shapes: all-MiniLM-L6-v2 at 32 x 128 tokens (4,096 rows; q/k/v and the intermediate projection read a
LayerNorm's float32 output, the attention output and the down projection a bf16 one) and
SmolLM2-135M at 4 x 256 (1,024 rows). The four take turns call by call (medians), so load on a
shared machine hits them alike. Prints a table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bench.measure import write_json
from deltatune.methods import lora_kernels

RANK, SCALING = 8, 2.0
#: (label, rows, d_in, d_out, dtype of x as the model hands it to the layer)
SHAPES = [
    ("minilm q/k/v", 4096, 384, 384, torch.float32),
    ("minilm attention out", 4096, 384, 384, torch.bfloat16),
    ("minilm intermediate", 4096, 384, 1536, torch.float32),
    ("minilm ffn out", 4096, 1536, 384, torch.bfloat16),
    ("smollm2 q/o", 1024, 576, 576, torch.float32),
    ("smollm2 k/v", 1024, 576, 192, torch.float32),
    ("smollm2 gate/up", 1024, 576, 1536, torch.float32),
    ("smollm2 down", 1024, 1536, 576, torch.bfloat16),
]


def _fused(merged: bool):
    def run(x, W, b, A, B):
        # the kernel's autograd function with the product form fixed (lora_linear picks it by merge_pays)
        return lora_kernels._LoraLinear.apply(x, W, b, A, B, SCALING, None, 1.0, torch.bfloat16, merged)
    return run


FORMS = {
    "merged": _fused(True),
    "plain": _fused(False),
    "formula": lambda x, W, b, A, B: F.linear(x, W, b) + F.linear(F.linear(x, A), B) * SCALING,
    "floor": lambda x, W, b, A, B: F.linear(x, W, b),
}


def time_shape(rows: int, d_in: int, d_out: int, x_dtype: torch.dtype, reps: int) -> dict[str, dict[str, float]]:
    g = torch.Generator().manual_seed(0)
    W = torch.randn(d_out, d_in, generator=g) / d_in ** 0.5               # frozen, float32
    b = torch.randn(d_out, generator=g)
    A = (torch.randn(RANK, d_in, generator=g) / d_in ** 0.5).requires_grad_()
    B = (torch.randn(d_out, RANK, generator=g) * 0.01).requires_grad_()
    x = torch.randn(rows, d_in, generator=g).to(x_dtype).requires_grad_()
    grad = torch.randn(rows, d_out, generator=g).to(torch.bfloat16)
    times: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in FORMS}
    for i in range(reps + 3):                                              # 3 warm-up turns
        for name, form in FORMS.items():
            x.grad = A.grad = B.grad = None
            with torch.autocast("cpu", dtype=torch.bfloat16):
                t0 = time.perf_counter()
                y = form(x, W, b, A, B)
                t1 = time.perf_counter()
            y.backward(grad)
            t2 = time.perf_counter()
            if i >= 3:
                times[name][0].append(t1 - t0)
                times[name][1].append(t2 - t1)
    return {k: {"forward_ms": 1e3 * statistics.median(f), "backward_ms": 1e3 * statistics.median(bw)}
            for k, (f, bw) in times.items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m bench.lora_layers", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=15, help="timed turns per shape (medians)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "lora-layers.json")
    args = p.parse_args(argv)
    if args.threads < 1 or args.reps < 1:
        raise SystemExit("error: --threads and --reps must be at least 1")
    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()
    res: dict[str, Any] = {"threads": args.threads, "reps": args.reps, "rank": RANK, "torch": torch.__version__,
                           "date": time.strftime("%Y-%m-%d %H:%M:%S"), "loadavg_start": load0, "shapes": {}}
    lines = ["| layer | rows | d_in → d_out | x | " + " | ".join(f"{k} fwd / bwd ms" for k in FORMS) + " |",
             "|---|--:|---|---|" + "--:|" * len(FORMS)]
    for label, rows, d_in, d_out, x_dtype in SHAPES:
        r = time_shape(rows, d_in, d_out, x_dtype, args.reps)
        res["shapes"][label] = {"rows": rows, "d_in": d_in, "d_out": d_out, "x_dtype": str(x_dtype), **r}
        lines.append(f"| {label} | {rows} | {d_in} → {d_out} | {str(x_dtype)[6:]} | "
                     + " | ".join(f"{t['forward_ms']:.2f} / {t['backward_ms']:.2f}" for t in r.values()) + " |")
        print(lines[-1], flush=True)
    res["loadavg_end"] = os.getloadavg()
    write_json(args.out, res)
    print("\n".join(lines[:2] + lines[2:]) + f"\nwrote {args.out}")
    return res


if __name__ == "__main__":
    main()
