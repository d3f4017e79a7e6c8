"""Quantized frozen base (QLoRA-style): LoRA on an fp32, bf16, int8 and NF4 base, side by side.

    python -m bench.quant                    # all-MiniLM-L6-v2 and SmolLM2-135M, step time + memory
    python -m bench.quant --quality          # also short training runs: sentiment accuracy, chat loss
    python -m bench.quant --quick            # tiny random models (a smoke test of this script)

Per setup, one process holds every setup's model (the frozen base built once per setup):

- ``resident``: bytes of the frozen model's tensors (``integrations.quantize.resident_bytes``:
  parameters, buffers and quantization state), and the same for the quantizable linear layers alone
  (the embedding table and the full-precision head are not quantized and dominate MiniLM's size);
- ``tensor_peak``: the peak of tensors a training step creates (bench/measure.py), so
  ``peak = resident + tensor_peak`` is the training peak with the weights included;
- ``rss``: peak resident-set growth over two steps, each setup in a fresh process (``--rss``);
- step time: interleaved rounds (bench/measure.py), medians, ratios to fp32.

Setups: ``fp32``, ``bf16`` (the whole model in bfloat16), ``int8`` and ``nf4`` (bitsandbytes, double
quantization, fp32 compute), ``nf4-torchao`` (torchao's NF4 tensor) and ``peft-nf4`` (Hugging Face PEFT's
LoRA on the same bitsandbytes NF4 base). SmolLM2 runs batch 1 x 256 with gradient checkpointing and
a chunked loss (``loss_chunk``: 256 tokens); MiniLM batch 32 x 128.

Writes bench/results/quant.json (``--quick``: quant-quick.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

import deltatune as dt
from bench.measure import interleaved, median, rss_growth, tensor_peak
from bench.quant_common import frozen_bytes, linear_bytes, versions, workload
from bench.workloads import Workload
from deltatune.integrations.quantize import DEFAULT_SKIP, quantized_linear, resident_bytes
from deltatune.train.memory import chunked_runner

warnings.filterwarnings("ignore", message="MatMul8bitLt")
SETUPS = ["fp32", "bf16", "int8", "nf4", "nf4-torchao", "peft-nf4"]
#: NF4 levers at 4 bits (the training options quantize_blocksize / quantize_skip), not in the default run
LEVER_SETUPS = {"nf4-bs32-skip-v": {"blocksize": 32, "skip": DEFAULT_SKIP + ("v_proj",)},
                "nf4-bs32-skip-attn": {"blocksize": 32, "skip": DEFAULT_SKIP + ("q_proj", "k_proj", "v_proj", "o_proj")}}
RSS_SETUPS = ["fp32", "int8", "nf4"]  # a fresh process each (imports + load): kept to the goal's rows
RESULTS = Path(__file__).parent / "results"


def build(setup: str, w: Workload) -> tuple[nn.Module, Any]:
    """The base in ``setup``'s storage with LoRA (rank 8) on ``w``'s targets; and its step function."""
    model = w.build()
    if setup == "bf16":
        model.to(torch.bfloat16)
    elif setup != "fp32":
        fmt = "int8" if setup == "int8" else "nf4"
        dt.quantize(model, fmt, backend="torchao" if setup == "nf4-torchao" else "bitsandbytes",
                    **LEVER_SETUPS.get(setup, {}))
    if setup == "peft-nf4":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=w.lora_target,
                                                 modules_to_save=w.head or None))
    else:
        dt.attach(model, dt.LoraConfig(target=w.lora_target, rank=8, alpha=16, modules_to_save=tuple(w.head)))
    if w.causal:
        enable = getattr(model, "gradient_checkpointing_enable")
        enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    batch = w.make_batch()
    run = (lambda m, b: m(**b))
    run = chunked_runner(run, 256) if w.causal else run

    def step() -> float:
        loss = run(model, batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())
    return model, step


def measure(models: list[str], setups: list[str], quick: bool, rounds: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in models:
        w = workload(name, quick)
        built, rows = {}, {}
        for setup in setups:
            try:
                model, step = build(setup, w)
            except Exception as e:  # e.g. torchao's block-size rule on a tiny model; recorded, not hidden
                rows[setup] = {"error": f"{type(e).__name__}: {e}"[:300]}
                continue
            step()  # warm-up (bitsandbytes and torchao build state on the first call)
            t0 = time.perf_counter()
            step()
            alone = time.perf_counter() - t0  # one step on its own (not interleaved): noisier
            peak = tensor_peak(step)["peak"]
            frozen = frozen_bytes(model)
            linear = None if setup.startswith("peft") else linear_bytes(model)  # PEFT wraps the layers its own way
            rows[setup] = {"resident_bytes": frozen, "linear_bytes": linear, "tensor_peak": peak,
                           "peak_with_weights": frozen + peak, "step_alone_s": alone}
            _partial(name, rows)
            built[setup] = step
            print(f"{name} {setup}: resident {frozen / 2**20:.1f} MiB, step tensor peak {peak / 2**20:.1f} MiB", flush=True)
        times = interleaved(built, rounds=rounds, warmup=0) if rounds else {}
        for setup, t in times.items():
            rows[setup]["step_s"] = median(t["wall"])
            rows[setup]["step_cpu_s"] = median(t["cpu"])
        base = rows.get("fp32", {})
        for setup, row in rows.items():
            if "error" in row or "resident_bytes" not in base:
                continue
            row["ratios_to_fp32"] = {k: row[k] / base[k] for k in
                                     ("resident_bytes", "linear_bytes", "peak_with_weights", "step_s", "step_alone_s")
                                     if base.get(k) and row.get(k) is not None}
        out[name] = {"workload": {"model": w.name, "batch": w.batch, "length": w.length,
                                  "gradient_checkpointing": w.causal, "loss_chunk": 256 if w.causal else None},
                     "setups": rows}
        del built
    return out


def step_times(models: list[str], setups: list[str], quick: bool, rounds: int, warmup: int,
               minilm_batch: int) -> dict[str, Any]:
    """Step time only: every setup built in one process, ``warmup`` untimed steps each, then
    ``rounds`` interleaved timed steps (order reversed every other round); medians and ratios."""
    import dataclasses

    out: dict[str, Any] = {}
    for name in models:
        w = workload(name, quick)
        if name == "minilm" and minilm_batch:
            w = dataclasses.replace(w, batch=minilm_batch)
        built, errors = {}, {}
        for setup in setups:
            try:
                built[setup] = build(setup, w)[1]
            except Exception as e:  # recorded, not hidden
                errors[setup] = f"{type(e).__name__}: {e}"[:300]
        times = interleaved(built, rounds=rounds, warmup=warmup)
        rows: dict[str, Any] = {s: {"error": e} for s, e in errors.items()}
        for setup, t in times.items():
            rows[setup] = {"step_s": median(t["wall"]), "step_cpu_s": median(t["cpu"]),
                           "wall": t["wall"], "cpu": t["cpu"]}
        base = rows.get("fp32", {})
        for row in rows.values():
            if "step_s" in row and "step_s" in base:
                row["ratio_to_fp32"] = {"wall": row["step_s"] / base["step_s"],
                                        "cpu": row["step_cpu_s"] / base["step_cpu_s"]}
        if "nf4" in rows and "peft-nf4" in rows and "step_s" in rows["peft-nf4"] and "step_s" in rows["nf4"]:
            rows["nf4"]["ratio_to_peft_nf4"] = {"wall": rows["nf4"]["step_s"] / rows["peft-nf4"]["step_s"],
                                                "cpu": rows["nf4"]["step_cpu_s"] / rows["peft-nf4"]["step_cpu_s"]}
        for row in rows.values():  # the median of per-round ratios: each pair ran back to back
            for other in ("fp32", "peft-nf4"):
                if "wall" in row and "wall" in rows.get(other, {}):
                    row[f"paired_ratio_to_{other}"] = {k: median([a / b for a, b in zip(row[k], rows[other][k])])
                                                       for k in ("wall", "cpu")}
        out[name] = {"workload": {"model": w.name, "batch": w.batch, "length": w.length,
                                  "gradient_checkpointing": w.causal, "loss_chunk": 256 if w.causal else None,
                                  "warmup": warmup, "rounds": rounds}, "setups": rows}
        print(name, {s: (r.get("ratio_to_fp32"), r.get("step_s")) for s, r in rows.items()}, flush=True)
        del built
    return out


def _partial(name: str, rows: dict[str, Any]) -> None:
    """What is measured so far, in case a slow machine ends the run early."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"quant-partial-{name}.json").write_text(json.dumps(rows, indent=2) + "\n")


def layer_speed(rounds: int = 20) -> dict[str, Any]:
    """One linear layer (SmolLM2's MLP, 576 -> 1536, 256 rows), forward + backward to the input, one
    thread, interleaved: the backends' kernels alone, without a model around them."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    linear = nn.Linear(576, 1536, bias=False).requires_grad_(False)
    layers = {"fp32": linear}
    for name, fmt, backend in [("bnb-nf4", "nf4", "bitsandbytes"), ("bnb-int8", "int8", "bitsandbytes"),
                               ("torchao-nf4", "nf4", "torchao")]:
        layers[name] = quantized_linear(linear, fmt, backend=backend)
    x = torch.randn(256, 576)

    def call(m: nn.Module) -> Any:
        def f() -> None:
            xx = x.clone().requires_grad_(True)
            m(xx).sum().backward()
        return f
    times = interleaved({k: call(m) for k, m in layers.items()}, rounds=rounds, warmup=2)
    ms = {k: median(t["cpu"]) * 1e3 for k, t in times.items()}
    return {"ms_cpu": ms, "ratio_to_fp32": {k: v / ms["fp32"] for k, v in ms.items()}}


SIZE_SETUPS = ["fp32", "bf16", "int8", "nf4", "nf4-no-dq", "nf4-torchao", "int8-bf16-rest", "nf4-bf16-rest"]


def sizes(models: list[str], quick: bool, setups: list[str] = SIZE_SETUPS) -> dict[str, Any]:
    """Resident bytes of the frozen model (no adapter, no training): whole model and linear layers.
    ``setups`` may also name a lever (``LEVER_SETUPS``), with ``-bf16-rest`` or not."""
    out: dict[str, Any] = {}
    for name in models:
        w = workload(name, quick)
        rows = {}
        for setup in ["fp32", *[s for s in setups if s != "fp32"]]:
            model = w.build()
            if setup == "bf16":
                model.to(torch.bfloat16)
            elif setup != "fp32":
                try:
                    dt.quantize(model, "int8" if setup.startswith("int8") else "nf4", double_quant=setup != "nf4-no-dq",
                                backend="torchao" if setup == "nf4-torchao" else "bitsandbytes",
                                rest_dtype=torch.bfloat16 if setup.endswith("bf16-rest") else None,
                                **LEVER_SETUPS.get(setup.removesuffix("-bf16-rest"), {}))
                except Exception as e:
                    rows[setup] = {"error": f"{type(e).__name__}: {e}"[:200]}
                    continue
            rows[setup] = {"resident_bytes": resident_bytes(model), "linear_bytes": linear_bytes(model)}
        for row in rows.values():
            if "error" not in row:
                row["ratios_to_fp32"] = {k: row[k] / rows["fp32"][k] for k in ("resident_bytes", "linear_bytes")}
        out[name] = rows
        print(name, {k: v.get("ratios_to_fp32", v) for k, v in rows.items()}, flush=True)
    return out


def rss(models: list[str], setups: list[str], quick: bool) -> dict[str, Any]:
    """RSS growth of two steps, each setup in a fresh process (``--rss-one``)."""
    out: dict[str, Any] = {}
    for name in models:
        for setup in setups:
            if setup not in RSS_SETUPS:
                continue
            cmd = [sys.executable, "-m", "bench.quant", "--rss-one", name, setup] + (["--quick"] if quick else [])
            res = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parent.parent)
            line = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
            out.setdefault(name, {})[setup] = json.loads(line[-1]) if line else {"error": res.stderr[-300:]}
    return out


def quality(quick: bool, only: str | None = None) -> dict[str, Any]:
    """Short real training runs through ``deltatune train``'s code (run_training), fp32 vs quantized
    (``only``: the runs whose name starts with it, e.g. ``smollm2``)."""
    import tempfile

    from deltatune.train import load_config, run_training

    runs = {
        "minilm-sentiment": (["model=all-minilm-l6-v2", "task=sentiment", "data.max_train_examples=2000",
                              "data.max_eval_examples=1000", "epochs=1", "batch_size=32", "max_length=64"],
                             ["none", "nf4"]),
        "smollm2-chat": (["model=smollm2-135m", "task=chat", "data.max_train_examples=96", "data.max_eval_examples=96",
                          "epochs=1", "batch_size=4", "max_length=128", "loss_chunk=256"], ["none", "nf4"]),
    }
    out: dict[str, Any] = {}
    for name, (sets, formats) in runs.items():
        if only is not None and not name.startswith(only):
            continue
        for fmt in formats:
            with tempfile.TemporaryDirectory() as tmp:
                config = load_config(None, [*sets, f"quantize={fmt}", "tensorboard=false", f"output={tmp}/run",
                                            "precision=fp32"])
                if quick:
                    continue
                from deltatune.train.chat import ChatTask

                ChatTask.samples = 0
                t0 = time.perf_counter()
                metrics = run_training(config, progress=False)
                keep = {k: metrics[k] for k in ("test_accuracy", "test_loss", "test_macro_f1", "steps",
                                                 "train_seconds", "peak_memory_mb") if k in metrics}
                out.setdefault(name, {})[fmt] = keep | {"wall_s": round(time.perf_counter() - t0, 1)}
                print(name, fmt, keep, flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--quality", action="store_true")
    p.add_argument("--quality-only", choices=["minilm", "smollm2"],
                   help="only the quality runs of this model; writes bench/results/quant-quality-<model>.json")
    p.add_argument("--no-rss", action="store_true")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--models", default="minilm,smollm2")
    p.add_argument("--setups", default=",".join(SETUPS))
    p.add_argument("--rss-one", nargs=2, metavar=("MODEL", "SETUP"))
    p.add_argument("--sizes-only", action="store_true", help="resident sizes only, no training steps")
    p.add_argument("--layer-only", action="store_true", help="one linear layer's forward+backward per backend")
    p.add_argument("--time-only", action="store_true", help="interleaved step times only (no memory, no RSS)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", default=None, help="--time-only / --sizes-only: results file ({model}: the model's name)")
    p.add_argument("--sizes-setups", default=None, help=f"--sizes-only setups (default {','.join(SIZE_SETUPS)}; "
                   f"levers: {', '.join(LEVER_SETUPS)}, each also with -bf16-rest)")
    p.add_argument("--minilm-batch", type=int, default=0, help="MiniLM batch for --time-only (0: the workload's 32)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rss_one:
        model, step = build(args.rss_one[1], workload(args.rss_one[0], args.quick))
        step()
        print(json.dumps(rss_growth(step)))
        return
    models, setups = args.models.split(","), args.setups.split(",")
    if args.layer_only:
        res = layer_speed()
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "quant-layer.json").write_text(json.dumps({"versions": versions(), **res}, indent=2) + "\n")
        print(json.dumps(res, indent=1))
        return
    if args.time_only:
        RESULTS.mkdir(exist_ok=True)
        res = step_times(models, setups, args.quick, args.rounds, args.warmup, args.minilm_batch)
        for name, block in res.items():
            path = RESULTS / f"quant-steps-{name}{'-quick' if args.quick else ''}.json"
            if args.out:
                path = Path(args.out.replace("{model}", name))
            path.write_text(json.dumps({"versions": versions(), "threads": torch.get_num_threads(),
                                        "load_before": list(__import__("os").getloadavg()), **block}, indent=2) + "\n")
            print(f"wrote {path}")
        return
    if args.quality_only:
        RESULTS.mkdir(exist_ok=True)
        load = list(__import__("os").getloadavg())
        runs = quality(args.quick, args.quality_only)
        path = RESULTS / f"quant-quality-{args.quality_only}{'-quick' if args.quick else ''}.json"
        path.write_text(json.dumps({"versions": versions(), "threads": torch.get_num_threads(), "load_before": load,
                                    "load_after": list(__import__("os").getloadavg()), "runs": runs}, indent=2) + "\n")
        print(f"wrote {path}")
        return
    if args.sizes_only:
        RESULTS.mkdir(exist_ok=True)
        path = Path(args.out) if args.out else RESULTS / ("quant-sizes-quick.json" if args.quick else "quant-sizes.json")
        chosen = args.sizes_setups.split(",") if args.sizes_setups else SIZE_SETUPS
        path.write_text(json.dumps({"versions": versions(), "sizes": sizes(models, args.quick, chosen)}, indent=2) + "\n")
        print(f"wrote {path}")
        return
    result: dict[str, Any] = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "cuda": torch.cuda.is_available(),
                    "note": "shared 2-core machine under load from other jobs; CUDA figures not recorded (no GPU)"},
        "versions": versions(),
        "speed_memory": measure(models, setups, args.quick, args.rounds),
    }
    if not args.no_rss:
        result["rss_growth"] = rss(models, setups, args.quick)
    if args.quality:
        result["quality"] = quality(args.quick)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / ("quant-quick.json" if args.quick else "quant.json")
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    for name, block in result["speed_memory"].items():
        print(f"\n{name} ({block['workload']})")
        for setup, row in block["setups"].items():
            r = row.get("ratios_to_fp32", {})
            print(f"  {setup:12s} " + (row["error"] if "error" in row else
                  " ".join(f"{k} {v:.2f}x" for k, v in r.items()) + f"  step {row.get('step_s', row['step_alone_s']):.3f}s"))


if __name__ == "__main__":
    main()
