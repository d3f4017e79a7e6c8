"""The HTTP surface: OpenAI's endpoints (and vLLM's adapter endpoints) over the engine.

Every error answers in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``:
unknown model 404, malformed body 400, body over ``max_body`` bytes 413, full queue 429 with
``Retry-After``, engine stopped 503. A client that goes away (a closed stream, or a dropped
connection while it waits for a whole answer) cancels its request, which leaves the batch at the
next step.
"""


import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from deltatune.serve.adapters import AdapterError, Pool
from deltatune.serve.engine import Engine, Job, QueueFull
from deltatune.serve.loading import Served, recorded_labels
from deltatune.serve.metrics import Metrics
from deltatune.serve.protocol import DONE, Chunks, HTTPFail, completion, error_body, schemas


@dataclass
class Limits:
    max_body: int = 1 << 20          # bytes of a request body
    max_tokens_default: int = 256    # chat completions without max_tokens
    retry_after: int = 1             # seconds, with 429


class Server:
    """The served model, its adapter pool and engine, and the FastAPI app over them."""

    def __init__(self, served: Served, adapters: dict[str, Any] | None = None, adapter_dir: Any = None,
                 max_loaded: int = 32, max_batch: int = 64, max_queue: int = 256, limits: Limits | None = None,
                 prefill_batch: int = 4, prefill_wait: int = 4) -> None:
        from pathlib import Path

        self.served = served
        self.metrics = Metrics()
        self.limits = limits or Limits()
        self.pool = Pool(served.model, self.metrics, max_loaded=max_loaded,
                         adapter_dir=Path(adapter_dir) if adapter_dir else None)
        for name, path in {**served.adapters, **(adapters or {})}.items():
            self.pool.register(name, path)
        self.engine = Engine(served.model, served.tokenizer, self.pool, self.metrics, max_batch=max_batch,
                             max_queue=max_queue, prefill_batch=prefill_batch, prefill_wait=prefill_wait)
        self.schemas = schemas()
        self.created = int(time.time())

    # --- lifecycle ------------------------------------------------------------------------------------

    def start(self) -> None:
        self.engine.start()

    def stop(self) -> None:
        self.engine.stop()
        self.pool.close()

    # --- helpers --------------------------------------------------------------------------------------

    async def _body(self, request: Any, schema: str) -> Any:
        from pydantic import ValidationError

        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > self.limits.max_body:
            raise HTTPFail(413, f"request body of {size} bytes is over the limit of {self.limits.max_body} "
                           "(--max-body-bytes)", code="request_too_large")
        raw = await request.body()
        if len(raw) > self.limits.max_body:
            raise HTTPFail(413, f"request body over the limit of {self.limits.max_body} bytes (--max-body-bytes)",
                           code="request_too_large")
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise HTTPFail(400, f"the request body is not valid JSON: {err}") from None
        try:
            return self.schemas[schema].model_validate(data)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise HTTPFail(400, f"{where}: {first['msg']}", param=where or None) from None

    def _adapter(self, model: str) -> str | None:
        """The adapter a request's ``model`` names (None: the base); 404 for an unknown name."""
        if model == self.served.name:
            return None
        if self.pool.knows(model):
            return model
        raise HTTPFail(404, f"The model `{model}` does not exist. Served: {self.served.name} and the adapters "
                       "in /v1/models", type_="NotFoundError", param="model", code="model_not_found")

    def _need(self, kind: str) -> None:
        if self.served.kind != kind:
            what = "generates text" if self.served.kind == "generate" else "classifies"
            raise HTTPFail(400, f"this server's base model {what}; use "
                           f"{'/v1/completions or /v1/chat/completions' if self.served.kind == 'generate' else '/v1/classify'}")

    def _prompt_ids(self, body: Any, chat: bool) -> list[int]:
        tok = self.served.tokenizer
        if chat:
            messages = []
            for m in body.messages:
                content = m.content if isinstance(m.content, str) else "".join(
                    part.get("text", "") for part in (m.content or []) if part.get("type") == "text")
                messages.append({"role": "system" if m.role == "developer" else m.role, "content": content})
            if getattr(tok, "chat_template", None):
                text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            else:  # the layout deltatune's chat task trains without a template
                text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant: "
            return tok(text, add_special_tokens=False)["input_ids"]
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            return list(prompt)
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise HTTPFail(400, "this server takes one prompt per request (send several requests: they are batched)",
                               param="prompt")
            prompt = prompt[0]
        return tok(prompt)["input_ids"]

    def _job(self, body: Any, chat: bool) -> tuple[Job, asyncio.Queue, str | None]:
        self._need("generate")
        adapter = self._adapter(body.model)
        if body.n != 1:
            raise HTTPFail(400, "n must be 1 (send n requests: they are batched)", param="n")
        prompt = self._prompt_ids(body, chat)
        if not prompt:
            raise HTTPFail(400, "the prompt is empty", param="prompt")
        room = self.served.max_len - len(prompt)
        max_tokens = body.max_completion_tokens or body.max_tokens or min(self.limits.max_tokens_default, room)
        if len(prompt) + max_tokens > self.served.max_len:
            raise HTTPFail(400, f"this model's maximum context length is {self.served.max_len} tokens; the prompt has "
                           f"{len(prompt)} and max_tokens asks for {max_tokens} more", param="max_tokens",
                           code="context_length_exceeded")
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(s for s in (body.stop or []) if s)
        if len(stop) > 4:
            raise HTTPFail(400, "stop takes at most 4 sequences", param="stop")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def deliver(event: tuple) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, event)

        job = Job(prompt=prompt, adapter=adapter, max_tokens=max_tokens, deliver=deliver, temperature=body.temperature,
                  top_p=body.top_p, stop=stop, seed=body.seed, ignore_eos=body.ignore_eos)
        if adapter is not None:
            self.pool.prefetch(adapter)  # read it from disk now, off the engine thread
        try:
            self.engine.submit(job)
        except QueueFull as err:
            raise HTTPFail(429, f"the server is busy: {err}; retry after {self.limits.retry_after} s",
                           type_="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(self.limits.retry_after)}) from None
        return job, queue, adapter

    # --- generation -----------------------------------------------------------------------------------

    async def generate(self, request: Any, chat: bool) -> Any:
        from fastapi.responses import JSONResponse, StreamingResponse

        body = await self._body(request, "chat" if chat else "completion")
        job, queue, _ = self._job(body, chat)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        endpoint = "/v1/chat/completions" if chat else "/v1/completions"
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(self._stream(job, queue, rid, body.model, chat, include_usage, endpoint,
                                                  body.return_token_ids),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        text, ids, finish, usage = [], [], None, None
        while finish is None:
            try:
                event = await asyncio.wait_for(queue.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancel()
                    self.engine.wake()
                    self.metrics.inc("deltatune_requests_total", endpoint=endpoint, status="499")
                    return JSONResponse({"error": {"message": "client closed the request"}}, status_code=499)
                continue
            if event[0] == "delta":
                text.append(event[1])
                ids.append(event[2])
            elif event[0] == "end":
                finish, usage = event[1], event[2]
            else:
                raise HTTPFail(event[1], event[2], type_="server_error" if event[1] >= 500 else "invalid_request_error")
        self.metrics.inc("deltatune_requests_total", endpoint=endpoint, status="200")
        return JSONResponse(completion(rid, body.model, chat, "".join(text), ids if body.return_token_ids else None,
                                       finish, usage))

    async def _stream(self, job: Job, queue: asyncio.Queue, rid: str, model: str, chat: bool, include_usage: bool,
                      endpoint: str, token_ids: bool = False) -> AsyncIterator[str]:
        sse = Chunks(rid, model, chat)
        done = False
        try:
            if chat:
                yield sse.role()
            while True:
                event = await queue.get()
                if event[0] == "delta":
                    if event[1] or token_ids:  # with return_token_ids, one event per token (its text may be held back)
                        yield sse.delta(event[1], None, [event[2]] if token_ids else None)
                elif event[0] == "end":
                    yield sse.delta(None if chat else "", event[1])
                    if include_usage:
                        yield sse.usage(event[2])
                    yield DONE
                    done = True
                    self.metrics.inc("deltatune_requests_total", endpoint=endpoint, status="200")
                    return
                else:
                    yield sse.error(event[2])
                    done = True
                    self.metrics.inc("deltatune_requests_total", endpoint=endpoint, status=str(event[1]))
                    return
        finally:
            if not done:  # the client went away mid-stream: free the slot
                job.cancel()
                self.engine.wake()
                self.metrics.inc("deltatune_requests_total", endpoint=endpoint, status="499")

    # --- classification ---------------------------------------------------------------------------------

    async def classify(self, request: Any) -> Any:
        body = await self._body(request, "classify")
        self._need("classify")
        adapter = self._adapter(body.model)
        texts = [body.input] if isinstance(body.input, str) else list(body.input)
        if not texts:
            raise HTTPFail(400, "input is empty", param="input")
        if adapter is not None:
            await asyncio.wrap_future(self.pool.prefetch(adapter))
        labels = (recorded_labels(self.pool.sources[adapter]) if adapter else None) or self._base_labels()
        future = self.engine.call(lambda: self._classify(adapter, texts))
        try:
            probs = await asyncio.wrap_future(future)
        except AdapterError as err:
            raise HTTPFail(err.status, str(err)) from None
        data = []
        for i, row in enumerate(probs):
            names = labels if len(labels) == len(row) else [f"LABEL_{k}" for k in range(len(row))]
            best = max(range(len(row)), key=row.__getitem__)
            data.append({"index": i, "label": names[best], "probabilities": dict(zip(names, row))})
        self.metrics.inc("deltatune_requests_total", endpoint="/v1/classify", status="200")
        return {"object": "list", "model": body.model, "data": data}

    def _base_labels(self) -> list[str]:
        id2label = getattr(self.served.model.config, "id2label", None) or {}
        return [id2label[k] for k in sorted(id2label)]

    def _classify(self, adapter: str | None, texts: list[str]) -> list[list[float]]:
        """On the engine thread: one routed forward over ``texts``."""
        import torch

        from deltatune.core.routing import routing

        if adapter is not None and not self.pool.ensure(adapter):
            raise AdapterError(f"every adapter slot is in use by running requests; retry (or raise --max-loaded)", 503)
        tok = self.served.tokenizer
        batch = tok(texts, padding=True, truncation=True, max_length=self.served.max_len, return_tensors="pt")
        batch = {k: v.to(self.engine.device) for k, v in batch.items()}
        with routing(self.served.model, [adapter] * len(texts)):
            logits = self.served.model(**batch).logits  # (n, labels)
        self.metrics.inc("deltatune_prompt_tokens_total", int(batch["attention_mask"].sum()))
        return torch.softmax(logits.float(), -1).tolist()

    # --- adapters -----------------------------------------------------------------------------------------

    async def load_adapter(self, request: Any) -> Any:
        from fastapi.responses import PlainTextResponse

        body = await self._body(request, "load")
        if body.lora_name == self.served.name:
            raise HTTPFail(400, f"{body.lora_name!r} is the base model's name; pick another adapter name")
        try:
            self.pool.register(body.lora_name, body.lora_path)
        except AdapterError as err:
            raise HTTPFail(err.status, str(err), param="lora_path") from None
        try:
            await asyncio.wrap_future(self.pool.prefetch(body.lora_name))
            await asyncio.wrap_future(self.engine.call(lambda: self.pool.ensure(body.lora_name)))
        except Exception as err:  # unreadable, or not fitting this base: forget it again
            self.pool.forget(body.lora_name)
            raise HTTPFail(400, str(err), param="lora_path") from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    async def unload_adapter(self, request: Any) -> Any:
        from fastapi.responses import PlainTextResponse

        body = await self._body(request, "unload")
        try:
            await asyncio.wrap_future(self.engine.call(lambda: self.pool.unload(body.lora_name)))
        except AdapterError as err:
            raise HTTPFail(err.status, str(err), param="lora_name") from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    def models(self) -> dict[str, Any]:
        base = {"id": self.served.name, "object": "model", "created": self.created, "owned_by": "deltatune",
                "root": self.served.name, "parent": None}
        adapters = [{"id": n, "object": "model", "created": self.created, "owned_by": "deltatune",
                     "root": self.served.name, "parent": self.served.name, "loaded": n in self.pool.loaded}
                    for n in self.pool.names()]
        return {"object": "list", "data": [base, *adapters]}

    # --- the app ----------------------------------------------------------------------------------------

    def app(self) -> Any:
        try:
            from fastapi import FastAPI, Request
            from fastapi.responses import JSONResponse, PlainTextResponse
        except ImportError:
            raise ImportError("deltatune serve needs FastAPI and uvicorn: pip install 'deltatune[serve]'") from None

        @asynccontextmanager
        async def lifespan(app: Any) -> AsyncIterator[None]:
            self.start()
            try:
                yield
            finally:
                self.stop()

        app = FastAPI(title="deltatune serve", lifespan=lifespan)

        @app.exception_handler(HTTPFail)
        async def _fail(request: Request, err: HTTPFail) -> JSONResponse:
            self.metrics.inc("deltatune_requests_total", endpoint=request.url.path, status=str(err.status))
            return JSONResponse(error_body(err.message, err.type, err.param, err.code), status_code=err.status,
                                headers=err.headers)

        @app.post("/v1/completions")
        async def completions(request: Request) -> Any:
            return await self.generate(request, chat=False)

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Any:
            return await self.generate(request, chat=True)

        @app.post("/v1/classify")
        async def classify(request: Request) -> Any:
            return await self.classify(request)

        @app.get("/v1/models")
        async def models() -> Any:
            return self.models()

        @app.post("/v1/load_lora_adapter")
        async def load(request: Request) -> Any:
            return await self.load_adapter(request)

        @app.post("/v1/unload_lora_adapter")
        async def unload(request: Request) -> Any:
            return await self.unload_adapter(request)

        @app.get("/health")
        async def health() -> Any:
            alive = self.engine._thread.is_alive()
            return JSONResponse({"status": "ok" if alive else "engine stopped"}, status_code=200 if alive else 503)

        @app.get("/metrics")
        async def metrics() -> Any:
            return PlainTextResponse(self.metrics.render(), media_type="text/plain; version=0.0.4")

        return app

