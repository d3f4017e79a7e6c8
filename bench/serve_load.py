"""The load generator of ``python -m bench.serve``: closed-loop clients over a seeded plan of
requests, each request's :class:`Record` (its tokens' arrival times), and the HTTP soak against a
real ``deltatune serve`` subprocess. A setup (deltatune's engine or the PEFT baseline) offers
``prepare(names)``, ``submit(prompt, adapter, max_tokens) -> Record`` and ``cancel_all()``."""

from __future__ import annotations

import os
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import deltatune as dt

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


# --- the load generator ------------------------------------------------------------------------


def make_plan(names: list[str | None], count: int, prompt_tokens: int, max_tokens: int, vocab: int,
              seed: int = 1) -> list[tuple[str | None, list[int], int]]:
    """``count`` requests: (adapter, prompt, max_tokens); lengths uniform in [x/2, 3x/2].

    The adapters are drawn from a stream of their own, so plans of one seed over different adapter
    lists hold the same prompts and lengths: rows for the bare base, 1 adapter or M adapters do
    the same work and differ only in the adapters they name."""
    rng, pick = random.Random(seed), random.Random(f"adapters-{seed}")

    def around(x: int) -> int:
        return rng.randint(max(1, x - x // 2), x + x // 2)

    return [(pick.choice(names), [rng.randrange(3, vocab) for _ in range(around(prompt_tokens))], around(max_tokens))
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
        counts = {"ok": 0, "failed": 0}  # tokens: the server's own counter, read from /metrics below
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

