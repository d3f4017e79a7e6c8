"""``python -m bench.serve_http``: ``bench/serve.py``'s load generator over HTTP, against a real
``deltatune serve`` subprocess on ``--device`` (cpu or cuda), beside PEFT's baseline on that device.

The server is started as a user would (``python -m deltatune serve BASE --adapter-dir DIR
--max-loaded 32 --device DEVICE``) and driven by ``--clients`` closed-loop clients
(``bench.serve_load.drive``: each sends its next request when the last one ends) over the same
seeded plan as ``bench/serve.py`` (``make_plan``: adapter uniform over the M, prompt and new
tokens ``x`` ± 50 %, greedy, end-of-sequence ignored). Each request is a streamed
``/v1/completions`` with ``return_token_ids``, so every generated token arrives as one event and
is timestamped by the client: tokens/s and requests/s inside the window, time to first token and
latency as the client sees them (HTTP, JSON and the server's event loop included).

Rows: deltatune's bare base, 1 adapter and each M (M > ``--max-loaded`` through that many
slots, the rest read from the server's host-memory cache) as chains of adjacent windows, the
order reversed from chain to chain (``--pairs`` chains per round), each goal ratio (1 / base,
M / 1) taken within a chain as in ``bench/serve.py``; then PEFT's rows (``bench/serve_peft.py``,
in this process on ``--device``: static ``adapter_names`` batches and one request at a time with
``set_adapter``), each M once per round. deltatune's rows pay for HTTP; PEFT's do not.

Before the rows, every adapter is requested once (one token each), so the server's host-memory
cache holds them all, as ``bench/serve.py``'s engine is given them; before a row with
M <= max-loaded its adapters are requested again so that they are attached (a warm cache).

The JSON is rewritten after every window (a run cut short keeps what it measured); the server's
stderr is kept beside it (``.server.log``). ``--quick``: a tiny random Llama, a smoke test.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import deltatune as dt  # noqa: E402
from bench.measure import write_json  # noqa: E402
from bench.serve import base_dir, label, load, write_adapters  # noqa: E402
from bench.serve_load import Record, drive, make_plan  # noqa: E402
from bench.serve_peft import PeftSetup  # noqa: E402
from bench.serve_report import row_line, summary, write  # noqa: E402


def _httpx() -> Any:
    """httpx2 (what the ``openai`` client uses, and what ``bench/gpu_carry.sh`` carries), else httpx:
    the same API."""
    try:
        import httpx2 as httpx
    except ImportError:
        import httpx
    return httpx


class Server:
    """``python -m deltatune serve`` as a subprocess on a free port; stderr into ``log``."""

    def __init__(self, base: Path, adapter_dir: Path, device: str, max_loaded: int, max_batch: int,
                 log: Path, threads: int = 0) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(Path(dt.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
        if device == "cpu" and threads:
            env["OMP_NUM_THREADS"] = str(threads)
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "deltatune", "serve", str(base), "--adapter-dir", str(adapter_dir),
             "--max-loaded", str(max_loaded), "--max-batch", str(max_batch), "--max-queue", str(4 * max_batch),
             "--device", device, "--port", str(port)],
            env=env, stdout=self._log_file, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{port}"

    def ready(self, timeout: float = 300) -> str:
        """Wait for ``/health``; the base model's name in ``/v1/models``."""
        httpx = _httpx()

        deadline = time.time() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"deltatune serve exited ({self.proc.returncode}): {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"deltatune serve did not start in {timeout:.0f} s")
            time.sleep(0.25)
        models = httpx.get(f"{self.url}/v1/models", timeout=30).json()["data"]
        return next(m["id"] for m in models if m.get("parent") is None)

    def metrics(self) -> dict[str, float]:
        """The server's counters and gauges (histograms as ``_sum`` / ``_count``), by name."""
        httpx = _httpx()

        out: dict[str, float] = {}
        for line in httpx.get(f"{self.url}/metrics", timeout=30).text.splitlines():
            if line and not line.startswith("#") and "{" not in line:
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log_file.close()


class HttpSetup:
    """``bench.serve_load``'s setup protocol over HTTP: each request a streamed completion on a
    worker thread (one per client), each token event timestamped as it arrives."""

    def __init__(self, server: Server, base_name: str, clients: int, max_loaded: int) -> None:
        self.server, self.base_name, self.max_loaded = server, base_name, max_loaded
        self.workers = ThreadPoolExecutor(max_workers=clients + 8, thread_name_prefix="http-client")
        self.local = threading.local()
        self.abort = threading.Event()
        self.pending: set[Future] = set()
        self.lock = threading.Lock()

    def _http(self) -> Any:
        httpx = _httpx()

        client = getattr(self.local, "client", None)
        if client is None:
            client = self.local.client = httpx.Client(timeout=300)
        return client

    def _run(self, rec: Record, body: dict[str, Any]) -> None:
        try:
            with self._http().stream("POST", f"{self.server.url}/v1/completions", json=body) as r:
                if r.status_code != 200:
                    r.read()
                    rec.finish(f"HTTP {r.status_code}: {r.text[:200]}")
                    return
                for line in r.iter_lines():
                    if self.abort.is_set():  # cancel_all: close the stream (the server frees the row)
                        rec.finish("cancelled")
                        return
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        rec.finish(f"server error: {event['error'].get('message')}")
                        return
                    for choice in event.get("choices") or []:
                        for _ in choice.get("token_ids") or ():
                            rec.token()
            rec.finish(None if len(rec.times) >= rec.want else f"stream ended after {len(rec.times)} of {rec.want} tokens")
        except Exception as err:  # noqa: BLE001 - a benchmark counts failures
            rec.finish(f"{type(err).__name__}: {err}")

    def _send(self, prompt: list[int], adapter: str | None, max_tokens: int) -> tuple[Record, Future]:
        rec = Record(max_tokens)
        body = {"model": adapter or self.base_name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True, "return_token_ids": True}
        future = self.workers.submit(self._run, rec, body)
        with self.lock:
            self.pending.add(future)
        future.add_done_callback(self._forget)
        return rec, future

    def _forget(self, future: Future) -> None:
        with self.lock:
            self.pending.discard(future)

    def submit(self, prompt: list[int], adapter: str | None, max_tokens: int) -> Record:
        return self._send(prompt, adapter, max_tokens)[0]

    def touch(self, names: list[str]) -> list[str]:
        """One one-token request per name (concurrently): read into the host cache and attached.
        The errors, if any."""
        sent = [self._send([5, 6, 7], n, 1) for n in names]
        wait([f for _, f in sent])
        return [f"{n}: {rec.error}" for n, (rec, _) in zip(names, sent) if rec.error]

    def prepare(self, names: list[str]) -> None:
        errors = self.touch(names[: self.max_loaded])
        if errors:
            raise RuntimeError(f"warming the adapters failed: {errors[:3]}")

    def cancel_all(self) -> None:
        """Stop every request in flight and wait until the server runs and holds none."""
        self.abort.set()
        with self.lock:
            pending = list(self.pending)
        wait(pending)
        self.abort.clear()
        deadline = time.time() + 120
        while time.time() < deadline:
            m = self.server.metrics()
            if not m.get("deltatune_batch_running") and not m.get("deltatune_queue_waiting"):
                return
            time.sleep(0.05)
        raise RuntimeError("the server still runs requests 120 s after every client went away")

    def close(self) -> None:
        self.workers.shutdown(wait=False, cancel_futures=True)


def _save(out: dict[str, Any], path: Path) -> None:
    write_json(path, out)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny random Llama: a smoke test")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--clients", type=int, default=16, help="concurrent clients (also the server's --max-batch)")
    ap.add_argument("--prompt-tokens", type=int, default=16, help="mean prompt length (uniform, +-50%%)")
    ap.add_argument("--max-tokens", type=int, default=16, help="mean new tokens per request (uniform, +-50%%)")
    ap.add_argument("--warmup", type=float, default=3.0, help="seconds each row runs before it is measured")
    ap.add_argument("--seconds", type=float, default=15.0, help="seconds each row is measured")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--pairs", type=int, default=2, help="chains of deltatune's rows per round (order reversed each)")
    ap.add_argument("--adapters", default="1,8,32,256", help="M values (comma-separated; 1 must be among them)")
    ap.add_argument("--max-loaded", type=int, default=32)
    ap.add_argument("--setups", default="deltatune,peft-batched,peft-switch")
    ap.add_argument("--threads", type=int, default=0, help="CPU only: torch threads here and in the server (0: default)")
    ap.add_argument("--adapter-cache", type=Path, default=None,
                    help="folder to write the random adapters into, or reuse them from (default: a temporary one)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/serve-http.json"))
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA device here")
    if args.device == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    counts = [int(m) for m in args.adapters.split(",")]
    if 1 not in counts:
        ap.error("--adapters must include 1 (the ratios are taken against it)")
    setups = args.setups.split(",")
    # Killed by a time limit (timeout sends SIGTERM): unwind, so the server subprocess is stopped
    # too; the JSON already holds every window measured.
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    began = time.time()
    results: dict[str, list[dict]] = {}
    chains: list[dict[str, Any]] = []
    live: dict[str, Any] = {}
    server: Server | None = None
    extra: dict[str, Any] = {"transport": {"deltatune": "HTTP (streamed /v1/completions, a deltatune serve subprocess)",
                                           "peft": "in-process (no HTTP)"}, "setup_s": {}}

    def report() -> dict[str, Any]:
        out = summary(args, argv, began, results, counts, chains)
        out["command"] = "python -m bench.serve_http " + " ".join(argv if argv is not None else sys.argv[1:])
        out["machine"]["device"] = args.device
        if args.device == "cuda":
            out["machine"].update(gpu=torch.cuda.get_device_name(0), cuda=torch.version.cuda,
                                  peft_max_memory_allocated_mib=torch.cuda.max_memory_allocated() / 2**20)
        return {**out, **extra}

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = base_dir(args.quick, root)
        adapter_dir = args.adapter_cache or root / "adapters"
        dirs = {f"a{i:03d}": p for i, p in enumerate(write_adapters(base, adapter_dir, max(counts)))}
        extra["setup_s"]["adapters_written"] = time.time() - began
        try:
            if "deltatune" in setups:  # started first: it loads while PEFT's copies load here
                server = Server(base, adapter_dir, args.device, args.max_loaded, args.clients,
                                args.out.with_suffix(".server.log"), args.threads)
            vocab = 0
            if {"peft-switch", "peft-batched"} & set(setups):
                for which in ("peft", "peft-many") if max(counts) > args.max_loaded else ("peft",):
                    model, tokenizer = load(base, args.device)
                    vocab = model.config.vocab_size
                    live[which] = PeftSetup(model, tokenizer, dirs, args.max_loaded, args.clients)
            if server is not None:
                base_name = server.ready()
                extra["setup_s"]["server_ready"] = time.time() - began
                live["deltatune"] = http = HttpSetup(server, base_name, args.clients, args.max_loaded)
                from transformers import AutoConfig

                vocab = AutoConfig.from_pretrained(base).vocab_size
                errors = http.touch(list(dirs))  # every adapter into the server's host-memory cache
                extra["warm_errors"] = errors[:5]
                extra["setup_s"]["adapters_warm"] = time.time() - began
            print(f"ready after {time.time() - began:.0f} s", flush=True)

            def measure(r: int, setup_name: str, m: int) -> dict[str, Any]:
                names: list[str | None] = [None] if m == 0 else list(dirs)[:m]
                many = m > args.max_loaded
                setup = live["deltatune" if setup_name == "deltatune" else "peft-many" if many else "peft"]
                if setup_name != "deltatune":
                    setup.batched = setup_name == "peft-batched"
                if not many and m:
                    setup.prepare([n for n in names if n is not None])
                plan = make_plan(names, 4096, args.prompt_tokens, args.max_tokens, vocab, seed=1)
                row = drive(setup, plan, args.clients, args.warmup, args.seconds)
                key = f"{setup_name} M={'base' if m == 0 else m}"
                results.setdefault(key, []).append(row)
                print(row_line(r, key, row, began), flush=True)
                _save(report(), args.out)
                return row

            chain = [0, *counts]
            peft_rows = [(s, m) for m in counts for s in setups if s.startswith("peft")]
            for r in range(args.rounds):
                if "deltatune" in setups:
                    for _ in range(args.pairs):
                        order = chain if len(chains) % 2 == 0 else chain[::-1]
                        got = {k: measure(r, "deltatune", k)["tokens_per_s"] for k in order}
                        chains.append({"round": r, "order": [label(k) for k in order],
                                       "tokens_per_s": {label(k): got[k] for k in order}})
                for setup_name, m in (peft_rows if r % 2 == 0 else peft_rows[::-1]):
                    measure(r, setup_name, m)
            if server is not None:
                extra["server_metrics"] = {k: v for k, v in server.metrics().items() if k.startswith(
                    ("deltatune_batch_size", "deltatune_generated", "deltatune_prompt", "deltatune_adapter_cache",
                     "deltatune_time_to_first_token_seconds_", "deltatune_rejected", "deltatune_disconnects"))}
                hist = extra["server_metrics"]
                if hist.get("deltatune_batch_size_count"):
                    extra["mean_rows_per_pass"] = hist["deltatune_batch_size_sum"] / hist["deltatune_batch_size_count"]
        finally:
            for setup in live.values():
                setup.close()
            if server is not None:
                server.close()
    signal.signal(signal.SIGTERM, previous)
    out = report()
    write(out, args.out)
    print(f"\n{'row':26s} {'tok/s':>8s} {'req/s':>7s} {'TTFT p50':>9s} {'p50':>7s} {'p99':>7s} {'failed':>6s}")
    for key, row in out["rows"].items():
        def s(x: float | None) -> str:
            return "-" if x is None else f"{x:.3f}"
        print(f"{key:26s} {row['tokens_per_s']:8.1f} {row['requests_per_s']:7.2f} {s(row.get('ttft_p50_s')):>9s} "
              f"{s(row.get('latency_p50_s')):>7s} {s(row.get('latency_p99_s')):>7s} {row['failed']:6.0f}")
    return out


if __name__ == "__main__":
    main()
