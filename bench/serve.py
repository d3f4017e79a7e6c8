"""``python -m bench.serve``: N concurrent clients over M adapters, deltatune serve vs PEFT.

A closed-loop load generator: ``--clients`` threads each send a request, wait for its last token,
and send the next, until ``--requests`` requests are done. Request ``i`` names adapter
``i mod M`` (shuffled with a fixed seed), carries a ``--prompt-tokens`` random prompt and asks
for exactly ``--max-tokens`` tokens (greedy, end-of-sequence ignored, so every setup does the
same work). Reported per setup: requests/s, generated tokens/s, time to first token (median)
and request latency p50 / p99.

Setups, taking turns in one process (order reversed every other round; medians over rounds):

- ``deltatune``: the engine behind ``deltatune serve`` (continuous batching, per-example routing,
  an LRU of ``--max-loaded`` attached adapters over a host-memory cache), for the bare base and for
  M = 1, 8, 32 and 256 adapters (256 with 32 attached);
- ``peft-switch``: PEFT serving one request at a time, ``set_adapter`` per request (an LRU of 32
  loaded adapters, loading from disk on a miss);
- ``peft-batched``: PEFT's ``adapter_names`` mixed batches, static batching: up to ``--clients``
  waiting requests form a batch that runs to its end (the same LRU).

The engine is driven in-process (no HTTP) so the three compare engine against engine;
``--soak SECONDS`` then runs ``deltatune serve`` as a real subprocess and hammers it over HTTP with
``--soak-clients`` clients for that long, counting failed requests (anything but a 200).

Adapters: LoRA r=8 on q_proj and v_proj with random weights, written in PEFT's format (both
libraries read the same files). Writes JSON (default ``bench/results/serve.json``).
``--quick`` uses a tiny random Llama: a smoke test whose figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import deltatune as dt  # noqa: E402

TARGET = ["q_proj", "v_proj"]
GOALS = {"32 adapters / 1 adapter": 0.8, "256 adapters (32 attached) / 1 adapter": 0.6, "1 adapter / base": 0.9}


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


# --- one request's record ----------------------------------------------------------------------


class Record:
    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first: float | None = None
        self.end: float | None = None
        self.tokens = 0
        self.done: Future = Future()

    def token(self) -> None:
        if self.first is None:
            self.first = time.perf_counter()
        self.tokens += 1

    def finish(self, error: str | None = None) -> None:
        self.end = time.perf_counter()
        if error:
            self.done.set_exception(RuntimeError(error))
        else:
            self.done.set_result(None)


# --- the setups: submit(prompt, adapter, max_tokens) -> Record -----------------------------------


class DeltatuneSetup:
    def __init__(self, model: Any, tokenizer: Any, dirs: dict[str, Path], max_loaded: int, max_batch: int) -> None:
        from deltatune.serve.adapters import Pool
        from deltatune.serve.engine import Engine
        from deltatune.serve.metrics import Metrics

        self.model = model
        self.metrics = Metrics()
        self.pool = Pool(model, self.metrics, max_loaded=max_loaded, host_cache=len(dirs) + 1)
        for name, path in dirs.items():
            self.pool.register(name, path)
        self.engine = Engine(model, tokenizer, self.pool, self.metrics, max_batch=max_batch, max_queue=1 << 20)
        self.engine.start()

    def submit(self, prompt: list[int], adapter: str | None, max_tokens: int) -> Record:
        from deltatune.serve.engine import Job

        rec = Record()

        def deliver(event: tuple) -> None:
            if event[0] == "delta":
                rec.token()
            elif event[0] == "end":
                rec.finish()
            else:
                rec.finish(str(event[2]))

        if adapter is not None:
            self.pool.prefetch(adapter)
        self.engine.submit(Job(prompt=prompt, adapter=adapter, max_tokens=max_tokens, deliver=deliver,
                               temperature=0.0, ignore_eos=True))
        return rec

    def close(self) -> None:
        self.engine.stop()
        for name in list(self.pool.loaded):
            self.pool.evict(name)
        self.pool.close()


class _Streamer:
    """transformers' streamer protocol: ``put`` gets the prompt first, then each step's tokens."""

    def __init__(self, records: list[Record]) -> None:
        self.records, self.prompt_seen = records, False

    def put(self, value: Any) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for rec in self.records:
            rec.token()

    def end(self) -> None:
        pass


class PeftSetup:
    """PEFT on one thread: per request (``batched=False``) or static ``adapter_names`` batches."""

    def __init__(self, model: Any, tokenizer: Any, dirs: dict[str, Path], max_loaded: int, max_batch: int,
                 batched: bool) -> None:
        from peft import PeftModel

        first = next(iter(dirs))
        self.peft = PeftModel.from_pretrained(model, dirs[first], adapter_name=first).eval()
        self.loaded: OrderedDict[str, None] = OrderedDict({first: None})
        self.dirs, self.max_loaded, self.max_batch, self.batched = dirs, max_loaded, max_batch, batched
        self.tokenizer = tokenizer
        self.queue: list[tuple[list[int], str | None, int, Record]] = []
        self.cv = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def submit(self, prompt: list[int], adapter: str | None, max_tokens: int) -> Record:
        rec = Record()
        with self.cv:
            self.queue.append((prompt, adapter, max_tokens, rec))
            self.cv.notify()
        return rec

    def _ensure(self, names: set[str]) -> None:
        for name in names:
            if name in self.loaded:
                self.loaded.move_to_end(name)
                continue
            while len(self.loaded) >= self.max_loaded:
                old = next(n for n in self.loaded if n not in names)
                self.peft.delete_adapter(old)
                del self.loaded[old]
            self.peft.load_adapter(self.dirs[name], adapter_name=name)
            self.loaded[name] = None

    def _loop(self) -> None:
        while True:
            with self.cv:
                while not self.queue and not self.stopping:
                    self.cv.wait()
                if self.stopping:
                    return
                take = self.max_batch if self.batched else 1
                batch, self.queue = self.queue[:take], self.queue[take:]
            try:
                self._run(batch)
            except Exception as err:  # noqa: BLE001 - a benchmark counts failures
                for *_, rec in batch:
                    rec.finish(f"{type(err).__name__}: {err}")

    def _run(self, batch: list) -> None:
        names = {a for _, a, _, _ in batch if a is not None}
        self._ensure(names)
        L = max(len(p) for p, *_ in batch)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (L - len(p)) + p for p, *_ in batch])
        mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p, *_ in batch])
        n = max(m for _, _, m, _ in batch)
        kwargs: dict[str, Any] = {}
        if self.batched:
            kwargs["adapter_names"] = [a if a is not None else "__base__" for _, a, _, _ in batch]
        elif batch[0][1] is None:
            kwargs = {}
        else:
            self.peft.set_adapter(batch[0][1])
        with torch.inference_mode():
            if not self.batched and batch[0][1] is None:
                with self.peft.disable_adapter():
                    self._generate(ids, mask, n, batch, kwargs)
            else:
                self._generate(ids, mask, n, batch, kwargs)
        for *_, rec in batch:
            rec.finish()

    def _generate(self, ids: Any, mask: Any, n: int, batch: list, kwargs: dict) -> None:
        self.peft.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           pad_token_id=self.tokenizer.pad_token_id, streamer=_Streamer([r for *_, r in batch]),
                           **kwargs)

    def close(self) -> None:
        with self.cv:
            self.stopping = True
            self.cv.notify()
        self.thread.join(timeout=60)
        self.peft.unload()  # the base model goes back as it was


# --- the load generator ------------------------------------------------------------------------


def drive(setup: Any, names: list[str | None], clients: int, requests: int, prompt_tokens: int, max_tokens: int,
          vocab: int) -> dict[str, Any]:
    rng = random.Random(1)
    order = rng.sample(names, len(names))  # with M > requests: a random subset of the M, each a cold miss
    plan = [(order[i % len(order)], [rng.randrange(3, vocab) for _ in range(prompt_tokens)]) for i in range(requests)]
    rng.shuffle(plan)
    records: list[Record] = []
    failures: list[str] = []
    lock = threading.Lock()
    cursor = iter(plan)

    def client() -> None:
        while True:
            with lock:
                item = next(cursor, None)
            if item is None:
                return
            rec = setup.submit(item[1], item[0], max_tokens)
            try:
                rec.done.result(timeout=1800)
            except Exception as err:  # noqa: BLE001
                failures.append(str(err))
            with lock:
                records.append(rec)

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    lat = sorted(r.end - r.start for r in records if r.end is not None)
    ttft = [r.first - r.start for r in records if r.first is not None]
    return {"requests_per_s": len(records) / wall, "tokens_per_s": sum(r.tokens for r in records) / wall,
            "ttft_p50_s": statistics.median(ttft) if ttft else None,
            "latency_p50_s": statistics.median(lat) if lat else None,
            "latency_p99_s": lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else None,
            "failed": len(failures), "wall_s": wall}


# --- the soak: a real server over HTTP -----------------------------------------------------------


def soak(base: Path, adapter_dir: Path, names: list[str], seconds: float, clients: int, max_tokens: int) -> dict:
    import httpx

    port = 18000 + os.getpid() % 1000
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(dt.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "deltatune", "serve", str(base), "--adapter-dir", str(adapter_dir),
                             "--max-loaded", "32", "--max-batch", "64", "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"deltatune serve exited: {proc.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise RuntimeError("deltatune serve did not start in 300 s")
            time.sleep(0.5)
        counts = {"ok": 0, "failed": 0, "tokens": 0}
        errors: list[str] = []
        lock = threading.Lock()
        stop_at = time.time() + seconds

        def client(k: int) -> None:
            rng = random.Random(k)
            with httpx.Client(timeout=600) as http:
                while time.time() < stop_at:
                    body = {"model": rng.choice(names), "prompt": "hello, how are you today?", "max_tokens": max_tokens,
                            "temperature": 0.7, "seed": rng.randrange(1 << 30), "stream": rng.random() < 0.5}
                    try:
                        r = http.post(f"{url}/v1/completions", json=body)
                        good = r.status_code == 200 and ("[DONE]" in r.text if body["stream"] else "choices" in r.json())
                    except Exception as err:  # noqa: BLE001
                        good, r = False, None
                        errors.append(f"{type(err).__name__}: {err}")
                    with lock:
                        counts["ok" if good else "failed"] += 1
                        if not good and r is not None:
                            errors.append(f"{r.status_code}: {r.text[:200]}")

        start = time.time()
        threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        metrics = httpx.get(f"{url}/metrics").text
        return {"seconds": time.time() - start, "clients": clients, **counts, "errors": errors[:5],
                "server_alive": proc.poll() is None,
                "generated_tokens": next((float(line.split()[-1]) for line in metrics.splitlines()
                                          if line.startswith("deltatune_generated_tokens_total")), None)}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# --- main ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny random Llama: a smoke test")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--adapters", default="1,8,32,256", help="M values (comma-separated)")
    ap.add_argument("--setups", default="deltatune,peft-switch,peft-batched")
    ap.add_argument("--soak", type=float, default=0.0, help="seconds of the HTTP soak (0: skip)")
    ap.add_argument("--soak-clients", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path("bench/results/serve.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    counts = [int(m) for m in args.adapters.split(",")]
    setups = args.setups.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = base_dir(args.quick, root)
        print(f"writing {max(counts)} adapters ...", flush=True)
        dirs = {f"a{i:03d}": p for i, p in enumerate(write_adapters(base, root / "adapters", max(counts)))}
        model, tokenizer = load(base)
        vocab = model.config.vocab_size
        runs: list[tuple[str, int]] = [("deltatune", 0)] + [(s, m) for s in setups for m in counts]
        results: dict[str, list[dict]] = {}
        for r in range(args.rounds):
            for setup_name, m in (runs if r % 2 == 0 else runs[::-1]):
                if setup_name not in setups:
                    continue
                names: list[str | None] = [None] if m == 0 else list(dirs)[:m]
                chosen = {n: dirs[n] for n in names if n is not None} or {"a000": dirs["a000"]}
                max_loaded = min(32, len(chosen))
                if setup_name == "deltatune":
                    setup: Any = DeltatuneSetup(model, tokenizer, chosen, max_loaded, args.clients)
                else:
                    setup = PeftSetup(model, tokenizer, chosen, max_loaded, args.clients, setup_name == "peft-batched")
                try:
                    row = drive(setup, names, args.clients, args.requests, args.prompt_tokens, args.max_tokens, vocab)
                finally:
                    setup.close()
                key = f"{setup_name} M={'base' if m == 0 else m}"
                results.setdefault(key, []).append(row)
                print(f"round {r}  {key:24s} {row['requests_per_s']:7.2f} req/s {row['tokens_per_s']:8.1f} tok/s  "
                      f"ttft p50 {row['ttft_p50_s']:.3f} s  latency p50 {row['latency_p50_s']:.3f} / p99 "
                      f"{row['latency_p99_s']:.3f} s  failed {row['failed']}", flush=True)
        table = {k: {f: statistics.median(r[f] for r in rows) for f in rows[0] if rows[0][f] is not None}
                 for k, rows in results.items()}
        ratios = _ratios(table, counts)
        out: dict[str, Any] = {"setup": vars(args) | {"out": str(args.out)}, "machine": {
            "python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(), "loadavg": os.getloadavg()}, "rows": table,
            "ratios": ratios, "goals": GOALS}
        if args.soak:
            print(f"soak: {args.soak_clients} clients for {args.soak:.0f} s over HTTP ...", flush=True)
            out["soak"] = soak(base, root / "adapters", list(dirs)[:32], args.soak, args.soak_clients, args.max_tokens)
            print(json.dumps(out["soak"]), flush=True)
    print(json.dumps(ratios, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(out, indent=1))
    os.replace(tmp_out, args.out)
    return out


def _ratios(table: dict[str, dict], counts: list[int]) -> dict[str, float]:
    def tps(key: str) -> float | None:
        return table.get(key, {}).get("tokens_per_s")

    ratios: dict[str, float] = {}
    one = tps("deltatune M=1")
    if one and tps("deltatune M=base"):
        ratios["1 adapter / base"] = one / tps("deltatune M=base")
    for m in counts:
        if m > 1 and one and tps(f"deltatune M={m}"):
            label = f"{m} adapters / 1 adapter" if m <= 32 else f"{m} adapters (32 attached) / 1 adapter"
            ratios[label] = tps(f"deltatune M={m}") / one
        for peft in ("peft-switch", "peft-batched"):
            if tps(f"deltatune M={m}") and tps(f"{peft} M={m}"):
                ratios[f"deltatune / {peft}, M={m}"] = tps(f"deltatune M={m}") / tps(f"{peft} M={m}")
    return ratios


if __name__ == "__main__":
    main()
