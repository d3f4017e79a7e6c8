"""Prometheus metrics in the text exposition format (version 0.0.4), written here.

``prometheus_client`` is not a dependency: the server's few counters, gauges and histograms are a
dict under a lock, and :meth:`Metrics.render` writes them as Prometheus scrapes them.
"""

from __future__ import annotations

import bisect
import threading

# seconds: from a few milliseconds (a decode step on a small model) to minutes (a long generation)
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

HELP = {
    "deltatune_requests_total": ("counter", "Requests answered, by endpoint and HTTP status."),
    "deltatune_prompt_tokens_total": ("counter", "Prompt tokens processed."),
    "deltatune_generated_tokens_total": ("counter", "Tokens generated."),
    "deltatune_queue_waiting": ("gauge", "Requests waiting to join the running batch."),
    "deltatune_batch_running": ("gauge", "Requests in the running batch."),
    "deltatune_batch_size": ("histogram", "Rows per forward pass (prefill and decode)."),
    "deltatune_adapters_loaded": ("gauge", "Adapters attached to the model."),
    "deltatune_adapter_cache_hits_total": ("counter", "Requests whose adapter was already attached."),
    "deltatune_adapter_cache_misses_total": ("counter", "Adapters attached on demand."),
    "deltatune_adapter_cache_evictions_total": ("counter", "Adapters detached to make room (LRU)."),
    "deltatune_rejected_total": ("counter", "Requests refused because the queue was full."),
    "deltatune_disconnects_total": ("counter", "Requests whose client went away before the end."),
    "deltatune_time_to_first_token_seconds": ("histogram", "From arrival to the first generated token."),
    "deltatune_request_latency_seconds": ("histogram", "From arrival to the last generated token."),
}


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
                     for k, v in sorted(labels.items()))
    return "{" + inner + "}"


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[tuple[str, str], float] = {}
        self._hist: dict[str, tuple[tuple[float, ...], list[int], list[float]]] = {}
        for name, (kind, _) in HELP.items():
            if kind == "histogram":
                buckets = SIZE_BUCKETS if name == "deltatune_batch_size" else BUCKETS
                self._hist[name] = (buckets, [0] * (len(buckets) + 1), [0.0])
            elif kind == "gauge" or name != "deltatune_requests_total":
                self._values[(name, "")] = 0.0

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        key = (name, _labels(labels))
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def set(self, name: str, value: float) -> None:
        with self._lock:
            self._values[(name, "")] = float(value)

    def observe(self, name: str, value: float) -> None:
        buckets, counts, total = self._hist[name]
        with self._lock:
            counts[bisect.bisect_left(buckets, value)] += 1
            total[0] += value

    def value(self, name: str, **labels: str) -> float:
        with self._lock:
            return self._values.get((name, _labels(labels)), 0.0)

    def render(self) -> str:
        lines = []
        with self._lock:
            for name, (kind, text) in HELP.items():
                lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
                if kind == "histogram":
                    buckets, counts, total = self._hist[name]
                    running = 0
                    for bound, count in zip(buckets, counts):
                        running += count
                        lines.append(f'{name}_bucket{{le="{bound}"}} {running}')
                    running += counts[-1]
                    lines += [f'{name}_bucket{{le="+Inf"}} {running}', f"{name}_sum {total[0]}",
                              f"{name}_count {running}"]
                else:
                    for (n, labels), value in self._values.items():
                        if n == name:
                            lines.append(f"{name}{labels} {value:g}")
        return "\n".join(lines) + "\n"
