"""Continuous batching over many adapters: one engine thread owns the model.

Each loop of the engine thread, in order:

1. runs the calls queued by HTTP handlers that must touch the model (classification, adapter
   load / unload), so the model is only ever used by this thread;
2. drops the rows whose client went away, and the finished ones;
3. admits waiting requests (up to ``max_batch`` running; while rows decode, only once a few
   are ready or the oldest has waited a few steps, so that newcomers share one prefill pass:
   :meth:`Engine._worth_prefilling`): their adapter is attached if it is not
   (:class:`~deltatune.serve.adapters.Pool`), and all of them are prefilled in *one* forward pass
   (packed one after another without padding, :mod:`.packing`, or left-padded), routed per
   request (requests for different adapters share it); their caches join the running batch (:mod:`.kv`);
4. runs one decode step for every running row: one forward pass, one token each, again routed
   per row, so a batch mixes adapters (and the bare base) freely.

The rows are routed by a :class:`deltatune.core.routing.Router` that stays open while the
attached adapters stay the same: a request joining or leaving re-routes the layers (computed once
per group of alike layers). It follows a cache miss that swaps an adapter into an evicted one's
modules (:meth:`Router.swap`: that slot of each stack rewritten, no walk of the model); any other
attach or detach re-opens it. A layer whose rows all use one low-rank adapter adds it with two
2-D products read from its slot of the stacked factors; a mixed layer gathers each row's factors
(see :mod:`deltatune.core.routing`); the bare base runs the plain layer.

Results go back through ``Job.deliver``, called on this thread; the HTTP side hands them to its
event loop. An exception in a step fails the requests in that step (status 500) and the engine
goes on with an empty batch: it never dies with the server still accepting requests.
"""

from __future__ import annotations

import contextlib
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from deltatune.core.routing import Router, Unpackable
from deltatune.serve import kv, packing
from deltatune.serve.adapters import AdapterError, Pool
from deltatune.serve.metrics import Metrics


class QueueFull(RuntimeError):
    """The waiting queue holds ``max_queue`` requests: answer 429 with Retry-After."""


@dataclass(eq=False)
class Job:
    """One generation request and its progress. ``adapter=None`` is the bare base."""

    prompt: list[int]
    adapter: str | None
    max_tokens: int
    deliver: Callable[[tuple], None]
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False  # generate exactly max_tokens (load tests; vLLM's extra of the same name)
    out: list[int] = field(default_factory=list)
    sent: int = 0  # characters of the text delivered so far
    finish: str | None = None
    cancelled: bool = False
    arrived: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    generator: torch.Generator | None = None
    arrived_step: int = 0  # the engine's decode step count when it was queued

    def cancel(self) -> None:
        self.cancelled = True


class Engine:
    def __init__(self, model: nn.Module, tokenizer: Any, pool: Pool, metrics: Metrics, max_batch: int = 64,
                 max_queue: int = 256, max_prefill_tokens: int = 8192, prefill_batch: int = 4,
                 prefill_wait: int = 4, pack: bool = True) -> None:
        from deltatune.integrations.transformers_cache import cache_keyword

        self.model, self.tokenizer, self.pool, self.metrics = model, tokenizer, pool, metrics
        self.max_batch, self.max_queue, self.max_prefill_tokens = max_batch, max_queue, max_prefill_tokens
        # A prefill is one more pass through every weight; while rows are decoding, waiting requests
        # are prefilled together once prefill_batch of them (or as many as are running) wait, or the
        # oldest has waited prefill_wait decode steps: see _worth_prefilling.
        self.prefill_batch, self.prefill_wait = max(1, prefill_batch), max(0, prefill_wait)
        self.steps = 0  # decode steps run
        self.device = next(model.parameters()).device
        self.cache_key = cache_keyword(model)
        self.dtype = next(model.parameters()).dtype
        self.pack = pack and packing.supported(model)  # prefill packed rows rather than padded ones
        self._keep = {"logits_to_keep": 1} if packing.keeps_logits(model) else {}
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        self.eos = set(eos) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())
        self.waiting: deque[Job] = deque()
        self.running: list[Job] = []
        self.batch: kv.Batch | None = None
        self.positions: Tensor | None = None  # (B,) each running row's next position id
        self._calls: deque[tuple[Callable[[], Any], Future]] = deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._router: Router | None = None       # open while the attached adapters stay the same
        self._router_version = -1                # the pool's attachment version it was opened at
        self._last_router: Router | None = None  # closed; lends its stacks' rows to the next one
        self._thread = threading.Thread(target=self._loop, name="deltatune-engine", daemon=True)

    # --- the HTTP side (any thread) ---------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout=10)

    def submit(self, job: Job) -> None:
        with self._cv:
            if len(self.waiting) >= self.max_queue:
                self.metrics.inc("deltatune_rejected_total")
                raise QueueFull(f"{len(self.waiting)} requests are waiting (--max-queue {self.max_queue})")
            if job.seed is not None:
                job.generator = torch.Generator().manual_seed(job.seed)
            job.arrived_step = self.steps
            self.waiting.append(job)
            self.metrics.set("deltatune_queue_waiting", len(self.waiting))
            self._cv.notify()
        if job.adapter is not None and job.adapter not in self.pool.loaded:
            # Admitted once read from disk: wake the engine then, rather than at its next timeout.
            read = self.pool.prefetch(job.adapter)
            if not read.done():
                read.add_done_callback(lambda _: self.wake())

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn`` on the engine thread between two steps; its result (or error) in the future."""
        future: Future = Future()
        with self._cv:
            self._calls.append((fn, future))
            self._cv.notify()
        return future

    def wake(self) -> None:
        with self._cv:
            self._cv.notify()

    # --- the engine thread -------------------------------------------------------------------------

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cv:
                    while not (self._stopping or self._calls or self.running or self._admissible()):
                        self._cv.wait(timeout=0.5)
                    if self._stopping:
                        break
                    calls = list(self._calls)
                    self._calls.clear()
                try:
                    self._step(calls)
                except Exception as err:  # fail this step's requests, keep serving
                    traceback.print_exc()
                    self._fail_all(f"internal error in the engine: {type(err).__name__}: {err}")
        self._leave()

    def _admissible(self) -> bool:
        return any(job.cancelled or job.adapter is None or self.pool.ready(job.adapter) for job in self.waiting)

    def _step(self, calls: list[tuple[Callable[[], Any], Future]]) -> None:
        if calls:
            self._leave()  # a call may attach or detach adapters
            for fn, future in calls:
                try:
                    future.set_result(fn())
                except BaseException as err:  # handed to the HTTP handler, which answers with it
                    future.set_exception(err)
        self._drop_finished()
        admitted = self._admit()
        if admitted:
            self._prefill(admitted)
            self._drop_finished()
        if self.running:
            self._decode()
            self._drop_finished()
        self.metrics.set("deltatune_batch_running", len(self.running))

    # --- admission and prefill ---------------------------------------------------------------------

    def _worth_prefilling(self, candidates: list[Job]) -> bool:
        """Whether to prefill now rather than after another decode step.

        On hardware where a pass costs about the same for 1 row as for 16 (a CPU reading every
        weight from memory once per pass), prefilling one newcomer per step costs a whole pass
        for one row; waiting a few steps lets several share it. So, while rows are decoding,
        prefill once ``prefill_batch`` requests are ready, or as many as are running (a small
        batch gains more from growing than it loses to one more pass), or the oldest ready one
        has waited ``prefill_wait`` decode steps. With nothing running, prefill at once.
        """
        if not self.running or self.prefill_batch <= 1:
            return True
        ready = [j for j in candidates if not j.cancelled and (j.adapter is None or self.pool.ready(j.adapter))]
        if not ready:
            return False
        if len(ready) >= min(self.prefill_batch, len(self.running)):
            return True
        return self.steps - min(j.arrived_step for j in ready) >= self.prefill_wait

    def _admit(self) -> list[Job]:
        admitted: list[Job] = []
        tokens = 0
        with self._cv:
            candidates = list(self.waiting)
        if not self._worth_prefilling(candidates):
            for job in candidates:
                if job.cancelled:
                    self._unqueue(job)
            return admitted
        for job in candidates:
            if len(self.running) + len(admitted) >= self.max_batch or tokens >= self.max_prefill_tokens:
                break
            if job.cancelled:
                self._unqueue(job)
                continue
            if job.adapter is not None:
                if not self.pool.ready(job.adapter):
                    continue  # still being read from disk: others go first
                try:
                    if not self.pool.ensure(job.adapter):
                        continue  # every slot is pinned by a running request: wait for one to finish
                except AdapterError as err:
                    self._unqueue(job)
                    job.deliver(("error", err.status, str(err)))
                    continue
                self.pool.pin(job.adapter)
            self._unqueue(job)
            admitted.append(job)
            tokens += len(job.prompt)
        return admitted

    def _unqueue(self, job: Job) -> None:
        with self._cv:
            self.waiting.remove(job)
            self.metrics.set("deltatune_queue_waiting", len(self.waiting))

    def _forward(self, names: list[str | None], ids: Tensor, mask: Tensor, positions: Tensor, cache: object,
                 lengths: list[int] | None = None, keep: Tensor | None = None) -> Tensor:
        """Logits ``(B, V)`` of each row's last position, row i routed through ``names[i]``; with
        ``lengths``, of the ``keep`` positions of one packed row (:mod:`.packing`)."""
        self._enter(names, lengths)
        self.metrics.observe("deltatune_batch_size", len(names))
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         **{self.cache_key: cache}, **({"logits_to_keep": keep} if keep is not None else self._keep))
        return out.logits[:, -1] if lengths is None else out.logits[0]

    def _prefill(self, jobs: list[Job]) -> None:
        """One pass for the admitted prompts: packed when that saves work (:mod:`.packing`), else padded."""
        cache, new = kv.build([]), None
        try:
            if self.pack and packing.worth([len(j.prompt) for j in jobs]):
                jobs = packing.by_adapter(jobs)
                lengths = [len(j.prompt) for j in jobs]
                ids, mask, positions, ends = packing.inputs([j.prompt for j in jobs], self.dtype, self.device)
                with contextlib.suppress(Unpackable):  # refused before the pass: prefill padded instead
                    logits = self._forward([j.adapter for j in jobs], ids, mask, positions, cache, lengths, ends)
                    kv.check_cache(cache)
                    new = kv.unpack(cache, lengths)
            if new is None:
                ids, mask, positions = packing.padded([j.prompt for j in jobs], self.tokenizer.pad_token_id or 0, self.device)
                logits = self._forward([j.adapter for j in jobs], ids, mask, positions, cache)
                kv.check_cache(cache)
                new = kv.Batch(cache, mask)
        except Exception:
            for job in jobs:
                if job.adapter is not None:
                    self.pool.unpin(job.adapter)
            raise
        self.metrics.inc("deltatune_prompt_tokens_total", sum(len(job.prompt) for job in jobs))
        self.batch = new if self.batch is None else self.batch.join(new)
        nexts = new.mask.sum(-1)  # (n,) each new row's next position id
        self.positions = nexts if self.positions is None else torch.cat([self.positions, nexts])
        self.running += jobs
        self._take(jobs, logits)

    # --- decode ------------------------------------------------------------------------------------

    def _decode(self) -> None:
        assert self.batch is not None and self.positions is not None
        ids = torch.tensor([[j.out[-1]] for j in self.running], device=self.device)            # (B, 1)
        mask = torch.cat([self.batch.mask, self.batch.mask.new_ones((self.batch.rows, 1))], 1)  # (B, T + 1)
        logits = self._forward([j.adapter for j in self.running], ids, mask, self.positions[:, None], self.batch.cache)
        self.batch.mask = mask
        self.positions = self.positions + 1
        self.steps += 1
        self._take(self.running, logits)

    def _take(self, jobs: list[Job], logits: Tensor) -> None:
        """Pick each row's next token (greedy rows in one argmax) and hand out the new text."""
        # The step's one wait for the device: the greedy picks, and the sampled rows' logits in one
        # copy (not a copy per row: on a GPU each would wait for the device again).
        greedy = logits.argmax(-1).tolist()
        sampled = [i for i, job in enumerate(jobs) if job.temperature != 0]
        host = dict(zip(sampled, logits[sampled].float().cpu())) if sampled else {}
        now = time.perf_counter()
        for i, job in enumerate(jobs):
            token = greedy[i] if job.temperature == 0 else sample(host[i], job.temperature, job.top_p, job.generator)
            job.out.append(token)
            self.metrics.inc("deltatune_generated_tokens_total")
            if job.first_token is None:
                job.first_token = now
                self.metrics.observe("deltatune_time_to_first_token_seconds", now - job.arrived)
            self._emit(job, token)

    def _emit(self, job: Job, token: int) -> None:
        """Deliver the text that is final (stop strings may still begin in the held-back tail)."""
        text = self.tokenizer.decode([t for t in job.out if t not in self.eos], skip_special_tokens=True)
        hits = [i for i in (text.find(s, job.sent) for s in job.stop) if i >= 0]
        if hits:
            job.finish, end = "stop", min(hits)
        elif token in self.eos and not job.ignore_eos:
            job.finish, end = "stop", len(text)
        elif len(job.out) >= job.max_tokens:
            job.finish, end = "length", len(text)
        else:
            end = len(text) - (max(len(s) for s in job.stop) - 1 if job.stop else 0)
            while end > job.sent and text[end - 1] == "\ufffd":  # half of a multi-byte character
                end -= 1
        job.deliver(("delta", text[job.sent:end] if end > job.sent else "", token))
        job.sent = max(job.sent, end)
        if job.finish is not None:
            job.deliver(("end", job.finish, {"prompt_tokens": len(job.prompt), "completion_tokens": len(job.out),
                                             "total_tokens": len(job.prompt) + len(job.out)}))
            self.metrics.observe("deltatune_request_latency_seconds", time.perf_counter() - job.arrived)

    def _drop_finished(self) -> None:
        keep = [i for i, j in enumerate(self.running) if j.finish is None and not j.cancelled]
        if len(keep) == len(self.running):
            return
        for i, job in enumerate(self.running):
            if i not in keep:
                if job.cancelled and job.finish is None:
                    self.metrics.inc("deltatune_disconnects_total")
                if job.adapter is not None:
                    self.pool.unpin(job.adapter)
        self.running = [self.running[i] for i in keep]
        if keep:
            assert self.batch is not None and self.positions is not None
            self.batch = self.batch.keep(keep)
            self.positions = self.positions[torch.tensor(keep, device=self.positions.device)]
        else:
            self.batch, self.positions = None, None
        self.pool.drop_unpinned()

    # --- routing block -------------------------------------------------------------------------------

    def _enter(self, names: list[str | None], lengths: list[int] | None = None) -> None:
        """Route the next forward pass's rows through ``names``. The router stays open while the
        attached adapters stay the same; re-routing other rows costs one pass over the layers."""
        if self._router is not None and self._router_version != self.pool.version:
            # Adapters swapped in place since it opened (a cache miss): the router follows them;
            # anything else attached or detached: re-open it.
            swaps = self.pool.swaps_since(self._router_version)
            if swaps is not None and all(self._router.swap(old, new) for old, new in swaps):
                self._router_version = self.pool.version
            else:
                self._leave()
        if self._router is None:
            self._router = Router(self.model, previous=self._last_router, changed=self.pool.take_changed(),
                                  stack_uniform=True)
            self._last_router = None
            self._router_version = self.pool.version
        if lengths is not None or self._router.names != names:
            self._router.route(names, lengths)

    def _leave(self) -> None:
        if self._router is not None:
            self._router.close()
            self._last_router, self._router = self._router, None

    def _fail_all(self, message: str) -> None:
        self._leave()
        for job in self.running:
            if job.finish is None:
                job.finish = "error"
                job.deliver(("error", 500, message))
            if job.adapter is not None:
                self.pool.unpin(job.adapter)
        self.running, self.batch, self.positions = [], None, None


def sample(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """One token from ``softmax(logits / temperature)``, restricted to the top-p nucleus (OpenAI's meaning)."""
    probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)  # (V,), on the host (the generator's device)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p  # the smallest prefix whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=generator))
