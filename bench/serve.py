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

deltatune's rows (the bare base, 1 adapter and each M: the three ratio goals) are measured as
*chains* instead (``--pairs`` chains per round; ``0``: as ordinary rows): their windows back to
back, on one plan (every row of every setup sends the same prompts and lengths; only the adapters
named differ, see ``make_plan``), the order reversed from chain to chain (base, 1, 32, 256, then
256, 32, 1, base, ...), and each ratio (1 / base, M / 1) taken within a chain; a goal's figure is
the median of its chains' ratios. Two rows measured minutes apart see different load (a 2-vCPU
machine shared with other work swings by 20-40 % between windows), a chain's adjacent windows
nearly the same. The rows' own figures are the medians of their chain windows; the ratios of the
row medians are kept beside the chain figures.

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


def load(path: Path, device: str | torch.device = "cpu") -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    from deltatune.train.models import load_tokenizer

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, load_tokenizer(path)


def write_adapters(path: Path, root: Path, count: int) -> list[Path]:
    """``count`` LoRA adapters with random weights, in PEFT's format (seeded: always the same ones).
    Adapters already in ``root`` from an earlier call (``a000``, ``a001``, ... with their
    ``.done`` marker) are kept, so two benches of one run can share one folder."""
    dirs = [root / f"a{i:03d}" for i in range(count)]
    if all((d / ".done").is_file() for d in dirs):
        return dirs
    model, _ = load(path)
    dt.attach(model, dt.LoraConfig(target=TARGET, rank=8, alpha=16), name="x")
    params = [p for n, p in model.named_parameters() if ".adapters." in n]
    g = torch.Generator().manual_seed(0)
    for d in dirs:
        with torch.no_grad():
            for p in params:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)  # drawn for every adapter: the same stream
        if not (d / ".done").is_file():
            written = dt.save_adapter(model, d, name="x", format="peft")
            (written / ".done").touch()
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
    ap.add_argument("--adapters", default="1,8,32,256", help="M values (comma-separated; the issue's rows by default)")
    ap.add_argument("--max-loaded", type=int, default=32)
    ap.add_argument("--prefill-batch", type=int, default=4, help="deltatune serve --prefill-batch")
    ap.add_argument("--prefill-wait", type=int, default=4, help="deltatune serve --prefill-wait")
    ap.add_argument("--pairs", type=int, default=1,
                    help="per round, chains of adjacent windows of deltatune's rows: the bare base, 1 adapter "
                         "and each M, order reversed from chain to chain (0: ordinary rows)")
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
        chain = [m for name, m in rows if name == "deltatune"]  # base, 1, each M
        if args.pairs and 1 in chain:  # deltatune's rows: measured as chains of adjacent windows
            rows = [("chain", 0)] + [row for row in rows if row[0] != "deltatune"]
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
        chains: list[dict[str, Any]] = []

        def measure(r: int, setup_name: str, m: int) -> dict[str, Any]:
            names: list[str | None] = [None] if m == 0 else list(dirs)[:m]
            many = m > args.max_loaded
            setup = live["deltatune" if setup_name == "deltatune" else "peft-many" if many else "peft"]
            if setup_name != "deltatune":
                setup.batched = setup_name == "peft-batched"
            if not many:  # a warm cache: the first min(M, max-loaded) adapters loaded
                setup.prepare([n for n in names if n is not None])
            plan = make_plan(names, 4096, args.prompt_tokens, args.max_tokens, vocab, seed=1)
            row = drive(setup, plan, args.clients, args.warmup, args.seconds)
            key = f"{setup_name} M={'base' if m == 0 else m}"
            results.setdefault(key, []).append(row)
            print(row_line(r, key, row, began), flush=True)
            return row

        try:
            for r in range(args.rounds):
                order = rows[r % len(rows):] + rows[: r % len(rows)]  # rotated, and reversed every other round
                for setup_name, m in (order if r % 2 == 0 else order[::-1]):
                    if setup_name != "chain":
                        measure(r, setup_name, m)
                        continue
                    # deltatune's rows in adjacent windows, the order reversed from chain to chain,
                    # on one plan: each ratio within a chain sees nearly the same load on both sides.
                    for _ in range(args.pairs):
                        order = chain if len(chains) % 2 == 0 else chain[::-1]
                        got = {k: measure(r, "deltatune", k)["tokens_per_s"] for k in order}
                        chains.append({"round": r, "order": [label(k) for k in order],
                                       "tokens_per_s": {label(k): got[k] for k in order}})
        finally:
            for setup in live.values():
                setup.close()
        out = summary(args, argv, began, results, counts, chains)
        if args.soak:
            print(f"soak: {args.soak_clients} clients for {args.soak:.0f} s over HTTP ...", flush=True)
            out["soak"] = soak(base, root / "adapters", list(dirs)[:32], args.soak, args.soak_clients, args.max_tokens)
            print(json.dumps(out["soak"]), flush=True)
    write(out, args.out)
    return out


def label(m: int) -> str:
    """A deltatune row's name in a chain: "base", "1 adapter", "M adapters"."""
    return "base" if m == 0 else "1 adapter" if m == 1 else f"{m} adapters"


def doc_first_line() -> str:
    return (__doc__ or "").split("\n\n")[0]


if __name__ == "__main__":
    main()
