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
"""

from __future__ import annotations

import argparse
import contextlib
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
import warnings
from collections import OrderedDict
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
    def __init__(self, want: int) -> None:
        self.want = want
        self.start = time.perf_counter()
        self.times: list[float] = []  # each generated token's arrival
        self.end: float | None = None
        self.error: str | None = None
        self.done = threading.Event()

    def token(self) -> None:
        if self.end is None:
            self.times.append(time.perf_counter())
            if len(self.times) >= self.want:
                self.finish()

    def finish(self, error: str | None = None) -> None:
        if self.end is None:
            self.end, self.error = time.perf_counter(), error
            self.done.set()


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
    """PEFT on one thread, alive for the whole run: one request at a time with ``set_adapter``
    (``batched = False``) or static ``adapter_names`` batches (``batched = True``)."""

    def __init__(self, model: Any, tokenizer: Any, dirs: dict[str, Path], max_loaded: int, max_batch: int) -> None:
        from peft import PeftModel

        first = next(iter(dirs))
        self.peft = PeftModel.from_pretrained(model, dirs[first], adapter_name=first).eval()
        self.loaded: OrderedDict[str, None] = OrderedDict({first: None})
        self.dirs, self.max_loaded, self.max_batch, self.batched = dirs, max_loaded, max_batch, False
        self.tokenizer = tokenizer
        self.queue: list[tuple[list[int], str | None, int, Record]] = []
        self.cv = threading.Condition()
        self.stopping = False
        self.abort = False  # cancel_all: the batch in progress stops at its next step
        self.busy = False
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def prepare(self, names: list[str]) -> None:
        with self.cv:
            assert not self.busy and not self.queue
            self._ensure(names[: self.max_loaded])

    def submit(self, prompt: list[int], adapter: str | None, max_tokens: int) -> Record:
        rec = Record(max_tokens)
        with self.cv:
            self.queue.append((prompt, adapter, max_tokens, rec))
            self.cv.notify()
        return rec

    def cancel_all(self) -> None:
        with self.cv:
            for *_, rec in self.queue:
                rec.finish("cancelled")
            self.queue = []
            self.abort = True
            while self.busy:
                self.cv.wait(0.01)
            self.abort = False

    def _ensure(self, names: list[str]) -> None:
        for name in names:
            if self.abort:  # cancel_all: do not finish loading a batch's adapters
                raise RuntimeError("cancelled")
            if name in self.loaded:
                self.loaded.move_to_end(name)
                continue
            while len(self.loaded) >= self.max_loaded:
                old = next(n for n in self.loaded if n not in names)
                with warnings.catch_warnings():  # "adapter ... was active which is now deleted"
                    warnings.simplefilter("ignore")
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
                take, distinct = 1, {self.queue[0][1]}
                while self.batched and take < min(self.max_batch, len(self.queue)):
                    distinct.add(self.queue[take][1])  # no more adapters in a batch than fit loaded
                    if len(distinct - {None}) > self.max_loaded:
                        break
                    take += 1
                batch, self.queue = self.queue[:take], self.queue[take:]
                self.busy = True
            try:
                self._run(batch)
            except Exception as err:  # noqa: BLE001 - a benchmark counts failures
                for *_, rec in batch:
                    rec.finish(f"{type(err).__name__}: {err}")
            finally:
                with self.cv:
                    self.busy = False
                    self.cv.notify_all()

    def _run(self, batch: list) -> None:
        from transformers import StoppingCriteria, StoppingCriteriaList

        setup = self

        class Abort(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                return torch.full((input_ids.shape[0],), setup.abort, dtype=torch.bool)

        names = list(dict.fromkeys(a for _, a, _, _ in batch if a is not None))
        self._ensure(names)
        L = max(len(p) for p, *_ in batch)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (L - len(p)) + p for p, *_ in batch])
        mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p, *_ in batch])
        n = max(m for _, _, m, _ in batch)
        kwargs: dict[str, Any] = {}
        if self.batched:
            kwargs["adapter_names"] = [a if a is not None else "__base__" for _, a, _, _ in batch]
        elif batch[0][1] is not None:
            self.peft.set_adapter(batch[0][1])
        with torch.inference_mode(), (self.peft.disable_adapter() if not self.batched and batch[0][1] is None
                                      else contextlib.nullcontext()):
            self.peft.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, pad_token_id=pad, streamer=_Streamer([r for *_, r in batch]),
                               stopping_criteria=StoppingCriteriaList([Abort()]), **kwargs)
        for *_, rec in batch:
            rec.finish(None if rec.end is None and len(rec.times) >= rec.want else "cancelled")

    def close(self) -> None:
        with self.cv:
            self.stopping = True
            self.cv.notify()
        self.thread.join(timeout=60)


# --- the load generator ------------------------------------------------------------------------


def make_plan(names: list[str | None], count: int, prompt_tokens: int, max_tokens: int, vocab: int,
              seed: int = 1) -> list[tuple[str | None, list[int], int]]:
    """``count`` requests: (adapter, prompt, max_tokens); lengths uniform in [x/2, 3x/2]."""
    rng = random.Random(seed)

    def around(x: int) -> int:
        return rng.randint(max(1, x - x // 2), x + x // 2)

    return [(rng.choice(names), [rng.randrange(3, vocab) for _ in range(around(prompt_tokens))], around(max_tokens))
            for _ in range(count)]


def drive(setup: Any, plan: list[tuple[str | None, list[int], int]], clients: int, warmup: float,
          seconds: float) -> dict[str, Any]:
    """Closed-loop clients over ``plan`` for ``warmup + seconds``; figures of the last ``seconds``."""
    records: list[Record] = []
    lock = threading.Lock()
    cursor = iter(plan * 100)
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            with lock:
                adapter, prompt, want = next(cursor)
            rec = setup.submit(prompt, adapter, want)
            with lock:
                records.append(rec)
            rec.done.wait()  # no polling: the clients stay off the GIL; cancel_all finishes every record

    start = time.perf_counter()
    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    t0, t1 = start + warmup, start + warmup + seconds
    time.sleep(max(0.0, t1 - time.perf_counter()))
    stop.set()
    with lock:
        taken = list(records)
    setup.cancel_all()
    for t in threads:
        t.join(timeout=60)
    setup.cancel_all()  # a request sent between the stop and the first cancel_all
    tokens = sum(t0 <= t < t1 for r in taken for t in r.times)
    finished = [r for r in taken if r.end is not None and t0 <= r.end < t1 and r.error is None]
    # Latency and time to first token: requests that finished in the window, less the first burst
    # (every client's first request, all sent at once when the row starts).
    begun = [r for r in finished if r.start > start + 0.2]
    failed = [r for r in taken if r.end is not None and r.end < t1 and r.error is not None]
    lat = sorted(r.end - r.start for r in begun)  # type: ignore[operator]
    ttft = sorted(r.times[0] - r.start for r in taken if r.times and r.start > start + 0.2 and t0 <= r.times[0] < t1)
    return {"tokens_per_s": tokens / seconds, "requests_per_s": len(finished) / seconds,
            "ttft_p50_s": statistics.median(ttft) if ttft else None,
            "latency_p50_s": statistics.median(lat) if lat else None,
            "latency_p99_s": lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else None,
            "finished": len(finished), "failed": len(failed)}


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
        try:
            for r in range(args.rounds):
                order = rows[r % len(rows):] + rows[: r % len(rows)]  # rotated, and reversed every other round
                for setup_name, m in (order if r % 2 == 0 else order[::-1]):
                    names: list[str | None] = [None] if m == 0 else list(dirs)[:m]
                    many = m > args.max_loaded
                    setup = live["deltatune" if setup_name == "deltatune" else "peft-many" if many else "peft"]
                    if setup_name != "deltatune":
                        setup.batched = setup_name == "peft-batched"
                    if not many:  # a warm cache: the first min(M, max-loaded) adapters loaded
                        setup.prepare([n for n in names if n is not None])
                    plan = make_plan(names, 4096, args.prompt_tokens, args.max_tokens, vocab, seed=1 + m)
                    row = drive(setup, plan, args.clients, args.warmup, args.seconds)
                    key = f"{setup_name} M={'base' if m == 0 else m}"
                    results.setdefault(key, []).append(row)
                    print(f"round {r}  {key:24s} {row['tokens_per_s']:8.1f} tok/s {row['requests_per_s']:6.2f} req/s  "
                          f"ttft p50 {_s(row['ttft_p50_s'])}  latency p50 {_s(row['latency_p50_s'])} / p99 "
                          f"{_s(row['latency_p99_s'])}  finished {row['finished']} failed {row['failed']}  "
                          f"[{time.time() - began:.0f} s]", flush=True)
        finally:
            for setup in live.values():
                setup.close()
        table = {k: {f: statistics.median(x[f] for x in runs) for f in runs[0]
                     if all(x[f] is not None for x in runs)} for k, runs in results.items()}
        ratios = _ratios(table, counts)
        out: dict[str, Any] = {
            "command": "python -m bench.serve " + " ".join(argv if argv is not None else sys.argv[1:]),
            "setup": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "machine": {"python": platform.python_version(), "torch": torch.__version__,
                        "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
                        "cores": os.cpu_count(), "loadavg_at_end": os.getloadavg()},
            "wall_s": time.time() - began, "rows": table, "rounds": results, "ratios": ratios,
            "goals": {k: {"target": v, "measured": ratios.get(k), "met": ratios.get(k, 0) >= v}
                      for k, v in GOALS.items()},
            "ahead_of_peft": {k: v > 1.0 for k, v in ratios.items() if "/ peft" in k}}
        if args.soak:
            print(f"soak: {args.soak_clients} clients for {args.soak:.0f} s over HTTP ...", flush=True)
            out["soak"] = soak(base, root / "adapters", list(dirs)[:32], args.soak, args.soak_clients, args.max_tokens)
            print(json.dumps(out["soak"]), flush=True)
    print(json.dumps({"ratios": ratios, "goals": out["goals"]}, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(out, indent=1))
    os.replace(tmp_out, args.out)
    return out


def doc_first_line() -> str:
    return (__doc__ or "").split("\n\n")[0]


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f} s"


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
