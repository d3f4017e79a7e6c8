"""``python -m bench.serve_step``: one decode step and one prefill of ``deltatune serve``'s engine,
bare base vs 1 adapter vs M adapters, on the same batch (no HTTP, no load generator).

The engine of ``bench/serve.py`` (``Pool`` + ``Engine``, not started: its methods run on this
thread), SmolLM2-135M-Instruct float32 with ``--adapters`` LoRA r 8 adapters on q/v (random weights,
PEFT's format, all attached). One seeded batch of ``--rows`` prompts (``--prompt-tokens`` ± 50 %
random tokens) serves every setup:

- ``base``: every row on the bare base; ``1 adapter``: every row on ``a000`` (the homogeneous
  path); ``M adapters``: row i on adapter ``i mod M`` spread over the M (a mixed batch);
- prefill: the engine's packed prefill of the rows (``Engine._forward`` with lengths, routing
  included); decode: one step of every row from the cache that setup's prefill left, through
  ``Engine._forward`` (its ``_enter``: the open router, re-routed only when the rows change, as
  in serving).

Setups take turns in blocks of ``--steps`` timed passes (one untimed pass first routes the rows),
``--rounds`` times, the order rotated each round, so drift and other load hit every setup alike.
Reported: the median wall and CPU time (``time.process_time``, all threads) per pass, and the
ratios to the bare base, both of the medians and the median of each round's ratio (adjacent
blocks). ``--profile``: after the rounds, torch's profiler and cProfile over the bare and the
1-adapter decode step. ``--churn``: every decode step re-routes the rows (their names rotated by
one), as in serving, where a row joins or leaves every few steps. ``--quick``: a tiny random Llama, a smoke test whose figures mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import os
import pstats
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from bench.measure import write_json  # noqa: E402
from bench.serve import base_dir, load, write_adapters  # noqa: E402
from bench.serve_report import write  # noqa: E402


class Bench:
    """The engine with every adapter attached, and per setup the rows' names, the packed prefill
    inputs and the cache that prefill left (decode steps start from it each time)."""

    def __init__(self, base: Path, adapters: dict[str, Path], rows: int, prompt_tokens: int,
                 counts: list[int] | None = None, device: str = "cpu", seed: int = 0) -> None:
        from deltatune.serve import kv, packing
        from deltatune.serve.adapters import Pool
        from deltatune.serve.engine import Engine
        from deltatune.serve.metrics import Metrics

        self.kv, self.packing = kv, packing
        model, tokenizer = load(base, device)
        metrics = Metrics()
        self.pool = Pool(model, metrics, max_loaded=len(adapters), host_cache=len(adapters) + 1)
        for name, path in adapters.items():
            self.pool.register(name, path)
        with _quick_attach():
            for name in adapters:
                self.pool.ensure(name)
        assert not any(p.requires_grad for p in model.parameters())
        self.engine = Engine(model, tokenizer, self.pool, metrics, max_batch=rows)
        rng = random.Random(seed)
        vocab = model.config.vocab_size
        lo, hi = max(1, prompt_tokens - prompt_tokens // 2), prompt_tokens + prompt_tokens // 2
        self.prompts = [[rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(rows)]
        names = list(adapters)
        self.setups: dict[str, list[str | None]] = {"base": [None] * rows, "1 adapter": [names[0]] * rows}
        for m in counts or [len(names)]:  # M adapters: row i on adapter i * M / rows of the first M
            if m > 1:
                self.setups[f"{m} adapters"] = [names[i * m // rows % m] for i in range(rows)]
        self.state: dict[str, dict[str, Any]] = {}
        self.churn = False  # decode: re-route the rows at every step (set by --churn)
        self._x = torch.randn((rows, 1, model.config.hidden_size), generator=torch.Generator().manual_seed(seed)).to(device)
        with torch.inference_mode():
            for setup, row_names in self.setups.items():
                order = sorted(range(rows), key=lambda i: "" if row_names[i] is None else "." + row_names[i])
                prompts = [self.prompts[i] for i in order]
                packed = [row_names[i] for i in order]
                lengths = [len(p) for p in prompts]
                ids, mask, positions, ends = packing.inputs(prompts, self.engine.dtype, self.engine.device)
                cache = kv.build([])
                logits = self.engine._forward(packed, ids, mask, positions, cache, lengths, ends)
                batch = kv.unpack(cache, lengths)
                padded = packing.padded(prompts, tokenizer.pad_token_id or 0, self.engine.device)
                self.state[setup] = {
                    "names": packed, "prefill": (ids, mask, positions, lengths, ends), "padded": padded,
                    "cache": kv.tensors(batch.cache), "mask": batch.mask,
                    "next": logits.argmax(-1)[:, None], "positions": batch.mask.sum(-1)[:, None]}

    def prefill(self, setup: str) -> torch.Tensor:
        s = self.state[setup]
        ids, mask, positions, lengths, ends = s["prefill"]
        return self.engine._forward(s["names"], ids, mask, positions, self.kv.build([]), lengths, ends)

    def prefill_padded(self, setup: str) -> torch.Tensor:
        """The same prompts' prefill left-padded to the longest (the engine's fallback; on a GPU the
        padding costs little and the packed row's per-adapter runs cost kernel launches)."""
        s = self.state[setup]
        ids, mask, positions = s["padded"]
        return self.engine._forward(s["names"], ids, mask, positions, self.kv.build([]))

    def decode(self, setup: str) -> torch.Tensor:
        """One decode step of every row from the prefill's cache (the cache tensors are not changed:
        the step concatenates its column into new ones)."""
        s = self.state[setup]
        names = s["names"]
        if self.churn:  # the rows' names rotated by one at every step: re-routed every time
            s["turn"] = turn = (s.get("turn", 0) + 1) % len(names)
            names = names[turn:] + names[:turn]
            if self.engine._router is not None:  # the base and 1 adapter too (their rotated names are equal)
                self.engine._router.names = None
        mask = torch.cat([s["mask"], s["mask"].new_ones((s["mask"].shape[0], 1))], 1)
        return self.engine._forward(names, s["next"], mask, s["positions"], self.kv.build(s["cache"]))


    def layers(self, setup: str, calls: int) -> None:
        """``calls`` calls of layer 0's adapted q and v projections on one decode step's input
        ``(rows, 1, d)``, routed as ``setup``'s rows (the per-layer cost, without the rest of the model)."""
        s = self.state[setup]
        self.engine._enter(s["names"])
        q, v, x = self._probe
        for _ in range(calls):
            q(x)
            v(x)

    @property
    def _probe(self) -> tuple[Any, Any, torch.Tensor]:
        attn = self.engine.model.model.layers[0].self_attn
        return attn.q_proj, attn.v_proj, self._x

    def adapted_layers(self) -> int:
        from deltatune.core.layer import AdaptedLayer

        return sum(isinstance(m, AdaptedLayer) for m in self.engine.model.modules())


@contextlib.contextmanager
def _quick_attach() -> Any:
    """Attach without ``attach``'s two walks over every parameter of the model (its report's
    counts, and re-freezing all but the active adapters): with k adapters attached each walk costs
    O(k), so attaching 256 one by one cost ~35 s of CPU, more than all the timing. ``Pool.ensure``
    freezes the new adapter's parameters itself (checked after: nothing trainable), and the
    report is not used; a server pays these walks on every attach until its slots are full
    (then it swaps in place)."""
    from deltatune.core import inject

    saved = inject._report, inject.mark_trainable
    inject._report, inject.mark_trainable = (lambda *a, **k: None), (lambda *a, **k: None)
    try:
        yield
    finally:
        inject._report, inject.mark_trainable = saved


def sync() -> None:
    """Wait for the GPU's queued work (a no-op without CUDA), so a timed region holds it all."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(fn: Any, *args: Any) -> tuple[float, float]:
    """Wall and host CPU seconds of ``fn(*args)``, the device's work included (synchronized
    before and after)."""
    sync()
    w, c = time.perf_counter(), time.process_time()
    fn(*args)
    sync()
    return time.perf_counter() - w, time.process_time() - c


def measure(bench: Bench, phase: str, rounds: int, steps: int) -> dict[str, Any]:
    """Blocks of ``steps`` timed passes per setup, setups taking turns, ``rounds`` times."""
    fn = {"decode": bench.decode, "prefill": bench.prefill, "prefill-padded": bench.prefill_padded,
          "layer": bench.layers}[phase]
    extra = (100,) if phase == "layer" else ()
    setups = list(bench.setups)
    per_round: list[dict[str, dict[str, float]]] = []
    with torch.inference_mode():
        for r in range(rounds):
            order = setups[r % len(setups):] + setups[: r % len(setups)]
            if r % 2:
                order = order[::-1]
            this: dict[str, dict[str, float]] = {}
            for setup in order:
                fn(setup, *extra)  # routes the rows (as the engine does when its batch changes)
                walls, cpus = zip(*(timed(fn, setup, *extra) for _ in range(steps)))
                this[setup] = {"wall_s": statistics.median(walls), "cpu_s": statistics.median(cpus)}
            per_round.append(this)
    table = {s: {f: statistics.median(r[s][f] for r in per_round) for f in ("wall_s", "cpu_s")} for s in setups}
    ratios = {}
    for s in setups[1:]:
        for f in ("wall_s", "cpu_s"):
            pairs = [r[s][f] / r["base"][f] for r in per_round]
            ratios[f"{s} / base, {f}"] = {"of_medians": table[s][f] / table["base"][f],
                                          "median_of_rounds": statistics.median(pairs),
                                          "rounds": [round(x, 4) for x in pairs]}
    return {"medians": table, "ratios": ratios, "rounds": per_round}


def profile(bench: Bench, steps: int) -> dict[str, str]:
    """torch's profiler (operators by self time: CPU, and CUDA on a GPU) and cProfile (Python, by
    own time) over ``steps`` decode steps of the bare base and of the 1-adapter setup."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cuda = bench.engine.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    out = {}
    with torch.inference_mode():
        for setup in ("base", "1 adapter"):
            bench.decode(setup)
            with torch_profile(activities=activities) as prof:
                for _ in range(steps):
                    bench.decode(setup)
                sync()
            ops = prof.key_averages().table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total",
                                            row_limit=25)
            pr = cProfile.Profile()
            pr.enable()
            for _ in range(steps):
                bench.decode(setup)
            sync()
            pr.disable()
            text = io.StringIO()
            pstats.Stats(pr, stream=text).sort_stats("tottime").print_stats(25)
            out[setup] = f"--- {setup}: torch ops ---\n{ops}\n--- {setup}: python ---\n{text.getvalue()}"
            print(out[setup], flush=True)
    return out


def machine(device: str) -> dict[str, Any]:
    """What ran it. On CUDA: the GPU's name and the peak of allocated memory so far (no RSS, no
    /proc: the host's figures say nothing about the device)."""
    out: dict[str, Any] = {"torch": torch.__version__, "device": device, "cores": os.cpu_count()}
    if device == "cuda":
        out.update(gpu=torch.cuda.get_device_name(0), cuda=torch.version.cuda,
                   max_memory_allocated_mib=torch.cuda.max_memory_allocated() / 2**20)
    else:
        out.update(threads=torch.get_num_threads(), loadavg=os.getloadavg())
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny random Llama: a smoke test")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=16, help="mean prompt length (uniform, +-50%%)")
    ap.add_argument("--adapters", default="32",
                    help="M values of the mixed setups (comma-separated, e.g. 32,256); the largest M are attached")
    ap.add_argument("--rounds", type=int, default=15, help="decode rounds (prefill: a third as many, at least 3)")
    ap.add_argument("--steps", type=int, default=5, help="timed passes per setup per round")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (CPU only)")
    ap.add_argument("--phases", default="decode,layer,prefill",
                    help="which of decode, layer, prefill, prefill-padded to time (decode always)")
    ap.add_argument("--churn", action="store_true",
                    help="decode: rotate the rows' names by one every step, so every step re-routes the layers "
                         "(and the mixed setup re-gathers its factors) as when rows join and leave; the "
                         "names no longer match the rows' caches, which the timing does not mind")
    ap.add_argument("--profile", type=int, default=0, help="profile this many decode steps per setup (0: no)")
    ap.add_argument("--adapter-cache", type=Path, default=None,
                    help="folder to write the random adapters into, or reuse them from (default: a temporary one)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/serve_step.json"))
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA device here")
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    counts = [int(m) for m in str(args.adapters).split(",")]
    began = time.time()
    phases = args.phases.split(",")
    out: dict[str, Any] = {"command": "python -m bench.serve_step " + " ".join(argv if argv is not None else sys.argv[1:]),
                           "setup": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                           "decode": None, "prefill": None, "prefill-padded": None, "layer": None, "profiles": {}}

    def save(final: bool = False) -> None:
        """The JSON so far (a run cut short keeps the phases it finished); the summary at the end."""
        out["machine"], out["wall_s"] = machine(args.device), time.time() - began
        keep = {"ratios": {p: out[p]["ratios"] for p in ("decode", "prefill", "prefill-padded", "layer") if out[p]},
                "goals": {}, **out}
        if final:
            write(keep, args.out)
        else:
            write_json(args.out, keep)

    with tempfile.TemporaryDirectory() as tmp:
        base = base_dir(args.quick, Path(tmp))
        dirs = write_adapters(base, args.adapter_cache or Path(tmp) / "adapters", max(counts))
        out["setup_s"] = {"adapters_written": time.time() - began}
        bench = Bench(base, {f"a{i:03d}": p for i, p in enumerate(dirs)}, args.rows, args.prompt_tokens, counts,
                      args.device)
        bench.churn = args.churn
        out["setup_s"]["engine_ready"] = time.time() - began
        print(f"ready after {time.time() - began:.0f} s: {len(dirs)} adapters attached, setups {list(bench.setups)}",
              flush=True)
        out["decode"] = measure(bench, "decode", args.rounds, args.steps)  # always: the layer phase is read against it
        save()
        if "layer" in phases:
            layer = measure(bench, "layer", args.rounds, args.steps)
            out["layer"] = {**layer, "calls": 100, "adapted_layers": bench.adapted_layers(),
                            "note": "times of 100 calls of layer 0's q_proj and v_proj each on a decode step's input"}
            save()
        for phase in ("prefill", "prefill-padded"):
            if phase in phases:
                out[phase] = measure(bench, phase, max(3, args.rounds // 3), max(1, args.steps // 2))
                save()
        if args.profile:
            out["profiles"] = profile(bench, args.profile)
        bench.pool.close()
    for phase in ("decode", "prefill", "prefill-padded"):
        for s, v in (out[phase] or {"medians": {}})["medians"].items():
            print(f"{phase:14s} {s:13s} wall {1e3 * v['wall_s']:8.2f} ms  host cpu {1e3 * v['cpu_s']:8.2f} ms", flush=True)
    pair = 2 * 100  # calls of an adapted layer per block (q and v)
    layer = out["layer"]
    for s, v in (layer or {"medians": {}})["medians"].items():
        extra = (v["wall_s"] - layer["medians"]["base"]["wall_s"]) / pair
        share = extra * layer["adapted_layers"] / out["decode"]["medians"]["base"]["wall_s"]
        print(f"layer          {s:13s} {1e6 * v['wall_s'] / pair:8.1f} us per adapted-layer call; over the base "
              f"{1e6 * extra:+6.1f} us, x {layer['adapted_layers']} layers = {100 * share:+.2f} % of a base decode step",
              flush=True)
    save(final=True)
    return out


if __name__ == "__main__":
    main()
