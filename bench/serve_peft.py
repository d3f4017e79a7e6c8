"""The PEFT baseline of ``python -m bench.serve``: PEFT on one thread serving the same adapters,
one request at a time (``set_adapter``) or in static ``adapter_names`` batches, with an LRU of
``max_loaded`` adapters loaded from disk on a miss, on the base model's device (PEFT's
``load_adapter`` puts a loaded adapter beside the layer it wraps)."""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from bench.serve_load import Record

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
        self.device = str(next(model.parameters()).device)
        self.peft = PeftModel.from_pretrained(model, dirs[first], adapter_name=first, torch_device=self.device).eval()
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
            self.peft.load_adapter(self.dirs[name], adapter_name=name, torch_device=self.device)
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
                return torch.full((input_ids.shape[0],), setup.abort, dtype=torch.bool, device=input_ids.device)

        names = list(dict.fromkeys(a for _, a, _, _ in batch if a is not None))
        self._ensure(names)
        L = max(len(p) for p, *_ in batch)
        pad = self.tokenizer.pad_token_id
        device = self.device
        ids = torch.tensor([[pad] * (L - len(p)) + p for p, *_ in batch], device=device)
        mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p, *_ in batch], device=device)
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

