"""The three parts of the benchmark: training, inference, save/load. Each returns plain dicts."""

from __future__ import annotations

import copy
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench import measure, setups
from bench.workloads import Workload


def train(workload: Workload, key: str, base: nn.Module, names: list[str], *, rounds: int,
          device: str, rss: list[str], checkpointing: bool = False, threads: int = 0) -> dict[str, Any]:
    """Step time (interleaved), tensor peak (in process) and RSS growth (fresh processes)."""
    built: dict[str, setups.Setup] = {}
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        try:
            built[name] = setups.build(name, workload, base)
        except setups.Unavailable as e:
            results[name] = {"unavailable": str(e)}
            print(f"  [{workload.name}] skipping {name}: {e}", flush=True)
            continue
        if checkpointing:
            setups.enable_checkpointing(built[name].model)
        built[name].model.to(device)
    batch = workload.make_batch(device=device)
    steps = {}
    for name, setup in built.items():
        opt = setup.optimizer()
        steps[name] = (lambda s=setup, o=opt: _step(s, batch, o))
        peak = measure.cuda_peak if device.startswith("cuda") else measure.tensor_peak
        mem = peak(steps[name])          # also the warm-up: the first two steps, fresh optimizer
        results[name] = {
            "tensor_peak": mem["peak"],
            "tensor_after": mem["after"],
            "trainable": sum(p.numel() for p in setup.trainable),
        }
        print(f"  [{workload.name}] {name}: peak {mem['peak'] / 2**20:.0f} MiB", flush=True)
    times = measure.interleaved(steps, rounds=rounds, warmup=0, device=device)  # the tracked steps warmed up
    for name, ts in times.items():
        results[name].update(step_s=measure.median(ts["wall"]), step_cpu_s=measure.median(ts["cpu"]),
                             step_all=ts["wall"], step_cpu_all=ts["cpu"])
    del built, steps
    gc.collect()
    if device == "cpu":
        for name in [n for n in rss if n in names and "unavailable" not in results[n]]:
            results[name].update(_rss_in_fresh_process(key, name, checkpointing, threads))
    return results


def _step(setup: setups.Setup, batch: dict[str, torch.Tensor], opt: torch.optim.Optimizer) -> float:
    with setup.engine():
        return measure.train_step(setup.model, batch, opt)


def _rss_in_fresh_process(key: str, name: str, checkpointing: bool, threads: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.worker", key, name, "--threads", str(threads or torch.get_num_threads())]
    cmd += ["--checkpointing"] if checkpointing else []
    cmd += ["--bf16"] if measure.AUTOCAST is not None else []
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=root, env=env)
    if done.returncode != 0:
        print(f"  RSS worker for {name} failed:\n{done.stderr[-2000:]}", flush=True)
        return {}
    out = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"  [{key}] {name}: RSS growth {out.get('rss_peak_growth', 0) / 2**20:.0f} MiB", flush=True)
    return out


def inference(workload: Workload, base: nn.Module, *, rounds: int, device: str) -> dict[str, Any]:
    """Forward latency of the base model, LoRA unmerged and merged, in deltatune and PEFT."""
    import deltatune

    batch = {k: v for k, v in workload.make_batch(device=device).items() if k != "labels"}
    models: dict[str, nn.Module] = {"base": copy.deepcopy(base)}
    dt = setups.build("deltatune-lora", workload, base).model
    setups.randomize_adapters(dt)
    models["deltatune-unmerged"] = dt
    models["deltatune-unmerged-thin"] = dt
    models["deltatune-merged"] = deltatune.merge(copy.deepcopy(dt))
    pf = setups.build("peft-lora", workload, base).model
    setups.randomize_adapters(pf)
    models["peft-unmerged"] = pf
    pf_merged = copy.deepcopy(pf)
    pf_merged.merge_adapter()
    models["peft-merged"] = pf_merged
    for m in models.values():
        m.eval().to(device)

    def forward(m: nn.Module, engine: str = "aten"):
        from deltatune.core.products import cpu_engine

        with torch.inference_mode(), cpu_engine(engine):
            return m(**batch).logits

    ref = forward(models["deltatune-unmerged"])
    merge_err = float((forward(models["deltatune-merged"]) - ref).abs().max())
    from deltatune.core.products import current_engine

    default_engine = current_engine()

    engines = {n: "thin" if n.endswith("-thin") else default_engine for n in models}
    times = measure.interleaved({n: (lambda m=m, e=engines[n]: forward(m, e)) for n, m in models.items()},
                                rounds=rounds, warmup=1, device=device)
    out = {n: {"forward_s": measure.median(ts["wall"]), "forward_cpu_s": measure.median(ts["cpu"]),
               "forward_all": ts["wall"]} for n, ts in times.items()}
    out["deltatune-merged"]["max_abs_diff_vs_unmerged"] = merge_err
    return out


def save_load(workload: Workload, base: nn.Module, *, rounds: int) -> dict[str, Any]:
    """Save and load time of the LoRA adapter, and its size on disk, in deltatune and PEFT."""
    import deltatune
    import peft

    dt = setups.build("deltatune-lora", workload, base).model
    pf = setups.build("peft-lora", workload, base).model
    savers = {"deltatune": lambda d: deltatune.save_adapter(dt, d), "peft": lambda d: pf.save_pretrained(d)}
    loaders = {"deltatune": lambda m, d: deltatune.load_adapter(m, d),
               "peft": lambda m, d: peft.PeftModel.from_pretrained(m, d)}
    out: dict[str, Any] = {lib: {"save_all": [], "load_all": []} for lib in savers}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds + 1):  # round 0 is a warm-up
            for lib in savers if r % 2 == 0 else list(savers)[::-1]:
                path = Path(tmp) / lib
                t0 = time.perf_counter()
                savers[lib](path)
                t1 = time.perf_counter()
                fresh = copy.deepcopy(base)
                t2 = time.perf_counter()
                loaders[lib](fresh, path)
                t3 = time.perf_counter()
                if r:
                    out[lib]["save_all"].append(t1 - t0)
                    out[lib]["load_all"].append(t3 - t2)
        for lib in savers:
            files = list((Path(tmp) / lib).iterdir())
            out[lib].update(
                save_s=measure.median(out[lib]["save_all"]),
                load_s=measure.median(out[lib]["load_all"]),
                weights_bytes=sum(f.stat().st_size for f in files if f.suffix == ".safetensors"),
                total_bytes=sum(f.stat().st_size for f in files),
            )
    return out
