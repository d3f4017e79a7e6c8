"""``python -m bench.serve``: N concurrent clients over M adapters, deltatune's engine vs PEFT.

A closed-loop load generator: ``--clients`` threads each send a request, wait for its last token
and send the next. Requests come from one seeded plan, the same for every setup: an adapter drawn
uniformly from the M, a random prompt of ``--prompt-tokens`` ± 50 % tokens, and ``--max-tokens``
± 50 % new tokens (greedy, end-of-sequence ignored, so every setup does the same work; lengths
vary as they do in real traffic, which is what continuous batching is for). Each row runs
``--warmup`` seconds, then is measured for ``--seconds``: generated tokens/s and requests/s
counted by timestamp inside the window, time to first token (median) and request latency
p50 / p99 of the requests that finished in it. Then the row's requests are cancelled.

Rows, taking turns in one process, ``--rounds`` times (each round in another order, so drift
and other load hit every row alike; the figures are medians over rounds):

- ``deltatune``: the engine behind ``deltatune serve`` (continuous batching, per-example routing,
  ``--max-loaded`` attached adapters over a host-memory cache holding all of them), for the bare
  base and for M = 1, 32 and 256 adapters (256 through 32 slots);
- ``peft-switch``: PEFT serving one request at a time, ``set_adapter`` per request;
- ``peft-batched``: PEFT's ``adapter_names`` mixed batches, static batching: up to ``--clients``
  waiting requests form a batch that runs to its longest request (a request counts as done at
  its own last token).

The bare base and 1 adapter (the "1 unmerged adapter / bare base" goal) are measured as *pairs*
instead (``--pairs`` per round, ``0``: as ordinary rows): the two windows back to back, on one
plan (the same prompts and lengths, only the adapter differs), the order alternating from pair to
pair (base first, then 1 adapter first, ...), and the ratio taken per pair; the goal's figure is
the median of the pairs' ratios. Two rows measured minutes apart see different load (a 2-vCPU
machine shared with other work swings by 20-30 % between windows), a pair's two windows nearly the
same. The 1-adapter row's figures (for 32 / 1 and 256 / 1) are the medians of its pair windows.

Both PEFT setups keep an LRU of ``--max-loaded`` adapters, loading from disk on a miss. Each
server lives for the whole run on its own copy of the base model (deltatune's; PEFT's for
M <= max-loaded; PEFT's for more), and before each row with M <= max-loaded its M adapters are
loaded, so those rows measure a warm cache; M = 256 rows start from whatever the previous such
row left in the cache and miss on most requests. The engines are driven in-process (no HTTP) so
the rows compare engine against engine; ``--soak SECONDS`` then runs ``deltatune serve`` as a
real subprocess under ``--soak-clients`` HTTP clients for that long, counting failed requests.

Adapters: LoRA r=8 on q_proj and v_proj with random weights, in PEFT's format (both libraries
read the same files). Writes JSON (default ``bench/results/serve.json``) with the rows, every
round's figures, the ratios (32/1, 256/1, 1/base, deltatune/PEFT per M) and the goals.
``--quick`` uses a tiny random Llama: a smoke test whose figures mean nothing.

This file holds the command, the model, the adapters and deltatune's setup; the load generator and
the soak are in ``bench/serve_load.py``, the PEFT baseline in ``bench/serve_peft.py``, the medians,
ratios, goals and JSON in ``bench/serve_report.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import deltatune as dt  # noqa: E402
from bench.serve_load import Record, drive, make_plan, soak  # noqa: E402
from bench.serve_peft import PeftSetup  # noqa: E402
from bench.serve_report import GOALS, row_line, summary, write  # noqa: E402

__all__ = ["GOALS", "DeltatuneSetup", "PeftSetup", "Record", "base_dir", "drive", "load", "main", "make_plan",
           "soak", "write_adapters"]

TARGET = ["q_proj", "v_proj"]


# --- model and adapters ------------------------------------------------------------------------


def base_dir(quick: bool, root: Path) -> Path:
    if quick:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tests.train.tiny import make_tiny_llama

        return make_tiny_llama(root / "tiny-llama")
    from deltatune.train.models import smollm2_dir

    return smollm2_dir()


def load(path: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    from deltatune.train.models import load_tokenizer

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, load_tokenizer(path)


def write_adapters(path: Path, root: Path, count: int) -> list[Path]:
    """``count`` LoRA adapters with random weights, in PEFT's format."""
    model, _ = load(path)
    dt.attach(model, dt.LoraConfig(target=TARGET, rank=8, alpha=16), name="x")
    params = [p for n, p in model.named_parameters() if ".adapters." in n]
    dirs = []
    g = torch.Generator().manual_seed(0)
    for i in range(count):
        with torch.no_grad():
            for p in params:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        dirs.append(dt.save_adapter(model, root / f"a{i:03d}", name="x", format="peft"))
    return dirs



# --- the setups: prepare(names), submit(prompt, adapter, max_tokens) -> Record, cancel_all() ------


class DeltatuneSetup:
    """The engine and adapter pool of ``deltatune serve``, alive for the whole run."""

    def __init__(self, model: Any, tokenizer: Any, dirs: dict[str, Path], max_loaded: int, max_batch: int,
                 prefill_batch: int = 4, prefill_wait: int = 4) -> None:
        from deltatune.serve.adapters import Pool
        from deltatune.serve.engine import Engine
        from deltatune.serve.metrics import Metrics

        self.model = model
        self.metrics = Metrics()
        self.pool = Pool(model, self.metrics, max_loaded=max_loaded, host_cache=len(dirs) + 1)
        for name, path in dirs.items():
            self.pool.register(name, path)
        for name in dirs:  # the host-memory tier: every adapter read once (a server reads on first use)
            self.pool.prefetch(name).result()
        self.engine = Engine(model, tokenizer, self.pool, self.metrics, max_batch=max_batch, max_queue=1 << 20,
                             prefill_batch=prefill_batch, prefill_wait=prefill_wait)
        self.engine.start()
        self.jobs: list[Any] = []
        self.max_loaded = max_loaded

    def prepare(self, names: list[str]) -> None:
        warm = names[: self.max_loaded]
        self.engine.call(lambda: [self.pool.ensure(n) for n in warm]).result()

    def submit(self, prompt: list[int], adapter: str | None, max_tokens: int) -> Record:
        from deltatune.serve.engine import Job

        rec = Record(max_tokens)

        def deliver(event: tuple) -> None:
            if event[0] == "delta":
                rec.token()
            elif event[0] == "end":
                rec.finish()
            else:
                rec.finish(str(event[2]))

        job = Job(prompt=prompt, adapter=adapter, max_tokens=max_tokens, deliver=deliver, temperature=0.0,
                  ignore_eos=True)
        self.jobs.append((job, rec))
        self.engine.submit(job)
        return rec

    def cancel_all(self) -> None:
        for job, rec in self.jobs:
            job.cancel()
            rec.finish("cancelled")  # no-op for the finished ones
        self.jobs = []
        self.engine.wake()
        # Wait until the engine has let every cancelled row go (the next row starts from an empty batch).
        while self.engine.call(lambda: len(self.engine.running) + len(self.engine.waiting)).result():
            time.sleep(0.01)

    def close(self) -> None:
        self.engine.stop()
        self.pool.close()



# --- main ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=doc_first_line())
    ap.add_argument("--quick", action="store_true", help="tiny random Llama: a smoke test")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=16, help="mean prompt length (uniform, +-50%%)")
    ap.add_argument("--max-tokens", type=int, default=16, help="mean new tokens per request (uniform, +-50%%)")
    ap.add_argument("--warmup", type=float, default=3.0, help="seconds each row runs before it is measured")
    ap.add_argument("--seconds", type=float, default=15.0, help="seconds each row is measured")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--adapters", default="1,32,256", help="M values (comma-separated)")
    ap.add_argument("--max-loaded", type=int, default=32)
    ap.add_argument("--prefill-batch", type=int, default=4, help="deltatune serve --prefill-batch")
    ap.add_argument("--prefill-wait", type=int, default=4, help="deltatune serve --prefill-wait")
    ap.add_argument("--pairs", type=int, default=1,
                    help="per round, pairs of adjacent windows of the bare base and 1 adapter (0: ordinary rows)")
    ap.add_argument("--setups", default="deltatune,peft-switch,peft-batched")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--soak", type=float, default=0.0, help="seconds of the HTTP soak (0: skip)")
    ap.add_argument("--soak-clients", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path("bench/results/serve.json"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    counts = [int(m) for m in args.adapters.split(",")]
    setups = args.setups.split(",")
    began = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = base_dir(args.quick, root)
        print(f"writing {max(counts)} adapters ...", flush=True)
        dirs = {f"a{i:03d}": p for i, p in enumerate(write_adapters(base, root / "adapters", max(counts)))}
        rows: list[tuple[str, int]] = [("deltatune", 0)] * ("deltatune" in setups) + [
            (s, m) for m in counts for s in setups]
        if args.pairs and ("deltatune", 1) in rows:  # base and 1 adapter: measured as pairs of windows
            rows = [("pair", 1)] + [row for row in rows if row not in (("deltatune", 0), ("deltatune", 1))]
        live: dict[str, Any] = {}
        vocab = 0
        if "deltatune" in setups:
            model, tokenizer = load(base)
            vocab = model.config.vocab_size
            live["deltatune"] = DeltatuneSetup(model, tokenizer, dirs, args.max_loaded, args.clients,
                                               args.prefill_batch, args.prefill_wait)
        if {"peft-switch", "peft-batched"} & set(setups):
            # Two PEFT servers: one for M <= max-loaded (it never evicts), one for more (its cache
            # stays in the state the misses leave it in, as a server's would).
            for which in ("peft", "peft-many") if max(counts) > args.max_loaded else ("peft",):
                model, tokenizer = load(base)
                vocab = model.config.vocab_size
                live[which] = PeftSetup(model, tokenizer, dirs, args.max_loaded, args.clients)
        print(f"ready after {time.time() - began:.0f} s", flush=True)
        results: dict[str, list[dict]] = {}
        pairs: list[dict[str, Any]] = []

        def measure(r: int, setup_name: str, m: int, seed: int) -> dict[str, Any]:
            names: list[str | None] = [None] if m == 0 else list(dirs)[:m]
            many = m > args.max_loaded
            setup = live["deltatune" if setup_name == "deltatune" else "peft-many" if many else "peft"]
            if setup_name != "deltatune":
                setup.batched = setup_name == "peft-batched"
            if not many:  # a warm cache: the first min(M, max-loaded) adapters loaded
                setup.prepare([n for n in names if n is not None])
            plan = make_plan(names, 4096, args.prompt_tokens, args.max_tokens, vocab, seed=seed)
            row = drive(setup, plan, args.clients, args.warmup, args.seconds)
            key = f"{setup_name} M={'base' if m == 0 else m}"
            results.setdefault(key, []).append(row)
            print(row_line(r, key, row, began), flush=True)
            return row

        try:
            for r in range(args.rounds):
                order = rows[r % len(rows):] + rows[: r % len(rows)]  # rotated, and reversed every other round
                for setup_name, m in (order if r % 2 == 0 else order[::-1]):
                    if setup_name != "pair":
                        measure(r, setup_name, m, seed=1 + m)
                        continue
                    # The bare base and 1 adapter in adjacent windows, first one then the other
                    # (ABBA...), on one plan (same prompts and lengths; make_plan draws alike from a
                    # list of one name): each pair's ratio sees the same load swings on both sides.
                    for _ in range(args.pairs):
                        first = (0, 1) if len(pairs) % 2 == 0 else (1, 0)
                        got = {k: measure(r, "deltatune", k, seed=1)["tokens_per_s"] for k in first}
                        pairs.append({"round": r, "order": ["base" if k == 0 else "1 adapter" for k in first],
                                      "base_tokens_per_s": got[0], "one_tokens_per_s": got[1],
                                      "ratio": got[1] / got[0] if got[0] else None})
        finally:
            for setup in live.values():
                setup.close()
        out = summary(args, argv, began, results, counts, pairs)
        if args.soak:
            print(f"soak: {args.soak_clients} clients for {args.soak:.0f} s over HTTP ...", flush=True)
            out["soak"] = soak(base, root / "adapters", list(dirs)[:32], args.soak, args.soak_clients, args.max_tokens)
            print(json.dumps(out["soak"]), flush=True)
    write(out, args.out)
    return out


def doc_first_line() -> str:
    return (__doc__ or "").split("\n\n")[0]


if __name__ == "__main__":
    main()
