"""Which adapters the server knows, which are in memory, and which are attached to the model.

Three tiers, as in S-LoRA:

- *known*: a name and the folder it loads from (``--adapter NAME=PATH``, a sub-folder of
  ``--adapter-dir``, or ``/v1/load_lora_adapter``);
- *host*: the adapter read from disk into CPU memory (:class:`~deltatune.core.stored.StoredAdapter`),
  kept in an LRU of ``host_cache`` entries. Reading happens on a worker thread as soon as a request
  names the adapter (:meth:`Pool.prefetch`), so the engine never waits on the disk;
- *loaded*: attached to the model (``install``), at most ``max_loaded`` of them, least recently
  used first out. An adapter that a running request uses is pinned and never evicted; a request
  whose adapter cannot be loaded because every slot is pinned waits in the queue.

Only the engine thread attaches and detaches (:meth:`Pool.ensure`, :meth:`Pool.evict`); the
HTTP threads only register names and start reads.
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn

from deltatune.core.records import adapted_layers, records
from deltatune.core.stored import StoredAdapter, install, reinstall
from deltatune.core.routing import delete_adapter
from deltatune.formats import read
from deltatune.serve.metrics import Metrics


class AdapterError(ValueError):
    """An adapter that cannot be served; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def is_adapter_dir(path: Path) -> bool:
    return (path / "adapter_config.json").is_file()


class Pool:
    def __init__(self, model: nn.Module, metrics: Metrics, max_loaded: int = 32, host_cache: int = 1024,
                 adapter_dir: Path | None = None) -> None:
        if max_loaded < 1:
            raise ValueError(f"--max-loaded must be at least 1, got {max_loaded}")
        self.model = model
        self.metrics = metrics
        self.max_loaded = max_loaded
        self.host_cache = max(host_cache, 1)
        self.adapter_dir = adapter_dir
        self.sources: dict[str, Path] = {}
        self.host: OrderedDict[str, Future[StoredAdapter]] = OrderedDict()
        self.loaded: OrderedDict[str, None] = OrderedDict()
        self.pins: Counter[str] = Counter()
        self.dropped: set[str] = set()  # unloaded while a request still ran on it: detach when it finishes
        self.version = 0  # counts attachments and detachments (the engine re-opens its router on a change)
        self.changed: set[str] = set()  # attached since the engine last asked (take_changed)
        # Per version since the last attach or detach that was not a swap in place: the swap
        # (evicted, attached) that made it. An open router follows these (swaps_since).
        self.swaps: list[tuple[int, str, str]] = []
        self.reshaped = 0  # the version of the last attach or detach that was not a swap in place
        self._lock = threading.Lock()
        self._reader = ThreadPoolExecutor(max_workers=2, thread_name_prefix="adapter-read")

    # --- known names (any thread) ---------------------------------------------------------------

    def register(self, name: str, path: str | Path) -> None:
        path = Path(path)
        if not is_adapter_dir(path):
            raise AdapterError(f"{path} holds no adapter_config.json; pass an adapter folder (deltatune's or PEFT's)")
        with self._lock:
            if name in self.sources:
                raise AdapterError(f"an adapter named {name!r} is already known; unload it first or pick another name")
            self.sources[name] = path

    def forget(self, name: str) -> None:
        """Drop ``name`` from the known adapters (the engine detaches it once no request uses it)."""
        with self._lock:
            if name not in self.sources and not self._in_dir(name):
                raise AdapterError(f"no adapter named {name!r}", status=404)
            self.sources.pop(name, None)
            self.host.pop(name, None)

    def _in_dir(self, name: str) -> Path | None:
        if self.adapter_dir is None or "/" in name or name.startswith("."):
            return None
        path = self.adapter_dir / name
        return path if is_adapter_dir(path) else None

    def knows(self, name: str) -> bool:
        with self._lock:
            if name in self.sources:
                return True
            path = self._in_dir(name)  # --adapter-dir: found on first use
            if path is not None:
                self.sources[name] = path
            return path is not None

    def names(self) -> list[str]:
        with self._lock:
            found = list(self.sources)
        if self.adapter_dir is not None and self.adapter_dir.is_dir():
            found += sorted(p.name for p in self.adapter_dir.iterdir() if is_adapter_dir(p) and p.name not in found)
        return found

    # --- host memory (any thread) ---------------------------------------------------------------

    def prefetch(self, name: str) -> Future[StoredAdapter]:
        """Start reading ``name`` from disk on a worker thread (a no-op if it is in host memory)."""
        with self._lock:
            future = self.host.get(name)
            if future is not None:
                self.host.move_to_end(name)
                return future
            path = self.sources[name]
            future = self._reader.submit(read, path, self.model)
            self.host[name] = future
            while len(self.host) > self.host_cache:
                self.host.popitem(last=False)
            return future

    # --- attached (engine thread) ---------------------------------------------------------------

    def ready(self, name: str) -> bool:
        """Whether :meth:`ensure` can attach ``name`` now without waiting on the disk."""
        if name in self.loaded:
            return True
        return self.prefetch(name).done()

    def ensure(self, name: str) -> bool:
        """Attach ``name`` if it is not, evicting the least recently used unpinned adapter when full.

        An evicted adapter of the same config and modules hands its modules over (the new tensors
        are copied into them: :func:`~deltatune.core.stored.reinstall`), so a swap costs a copy of
        the adapter's tensors rather than a detach and an attach.
        False when every slot is pinned by running requests (try again after one finishes).
        Raises :class:`AdapterError` for an adapter that cannot be read or does not fit the base.
        """
        if name in self.loaded:
            self.loaded.move_to_end(name)
            self.metrics.inc("deltatune_adapter_cache_hits_total")
            return True
        victim = None
        if len(self.loaded) >= self.max_loaded:
            victim = next((n for n in self.loaded if not self.pins[n]), None)
            if victim is None:
                return False
        future = self.prefetch(name)
        try:
            value = future.result()
        except Exception as err:
            with self._lock:
                self.host.pop(name, None)
            raise AdapterError(f"adapter {name!r} could not be read: {err}") from None
        self.version += 1
        if victim is not None:
            with torch.inference_mode(False), torch.no_grad():
                swapped = victim not in self.dropped and reinstall(self.model, value, name, victim)
            if swapped:
                del self.loaded[victim]
                self.metrics.inc("deltatune_adapter_cache_evictions_total")
                self.swaps.append((self.version, victim, name))
                self._attached(name)
                return True
            self.evict(victim)
        self._reshape()
        try:
            # Normal tensors, though the engine runs under inference_mode: routing reads their version counters.
            with torch.inference_mode(False), torch.no_grad():
                install(self.model, value, name, activate=False)
        except (ValueError, KeyError, RuntimeError) as err:
            raise AdapterError(f"adapter {name!r} does not fit this base model: {err}") from None
        if records(self.model)[name].handles:  # model-level hooks (virtual tokens, prefixes) see no routing
            delete_adapter(self.model, name)
            raise AdapterError(f"adapter {name!r} works through model-level hooks (prompt / prefix tuning), "
                               "which per-example routing cannot serve; serve a layer adapter (LoRA, DoRA, (IA)3, ...)")
        for _, layer in adapted_layers(self.model):  # frozen: only the new adapter's tensors can be trainable
            if name in layer.adapters:
                for p in layer.adapters[name].parameters():
                    p.requires_grad_(False)
        self._attached(name)
        return True

    def _reshape(self) -> None:
        self.reshaped, self.swaps = self.version, []

    def swaps_since(self, version: int) -> list[tuple[str, str]] | None:
        """The swaps in place (evicted, attached), in order, that took the attachments from
        ``version`` to now; None if anything else was attached or detached since (re-open)."""
        if version < self.reshaped:
            return None
        return [(old, new) for v, old, new in self.swaps if v > version]

    def take_changed(self) -> set[str]:
        """The names attached since the last call (their tensors are new; all others are as they were)."""
        changed, self.changed = self.changed, set()
        return changed

    def _attached(self, name: str) -> None:
        self.loaded[name] = None
        self.changed.add(name)
        self.metrics.inc("deltatune_adapter_cache_misses_total")
        self.metrics.set("deltatune_adapters_loaded", len(self.loaded))

    def evict(self, name: str) -> None:
        self.version += 1
        self._reshape()
        delete_adapter(self.model, name)
        del self.loaded[name]
        self.metrics.inc("deltatune_adapter_cache_evictions_total")
        self.metrics.set("deltatune_adapters_loaded", len(self.loaded))

    def unload(self, name: str) -> None:
        """``/v1/unload_lora_adapter`` (engine thread): forget ``name`` and detach it, now or when
        the requests running on it finish. An ``--adapter-dir`` adapter stays known (its folder is
        still there) and loads again on its next use."""
        self.forget(name)
        if name in self.loaded:
            self.dropped.add(name)
        self.drop_unpinned()

    def drop_unpinned(self) -> None:
        for name in [n for n in self.dropped if not self.pins[n]]:
            self.dropped.discard(name)
            if name in self.loaded:
                self.evict(name)

    def pin(self, name: str) -> None:
        self.pins[name] += 1

    def unpin(self, name: str) -> None:
        self.pins[name] -= 1
        if self.pins[name] <= 0:
            del self.pins[name]

    def close(self) -> None:
        self._reader.shutdown(wait=False, cancel_futures=True)
