"""``deltatune serve MODEL [--adapter NAME=PATH ...] [--adapter-dir DIR] [--max-loaded N]``: an OpenAI-compatible server."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from deltatune.cli.common import fail_cleanly


def serve(
    model: Annotated[str, typer.Argument(help="A built-in model name, a model directory, or a training run.")],
    adapter: Annotated[list[str] | None, typer.Option(
        "--adapter", help="An adapter to serve, NAME=PATH (deltatune's or PEFT's format; repeatable). Requests "
        "name it in their 'model' field.")] = None,
    adapter_dir: Annotated[Path | None, typer.Option(
        "--adapter-dir", help="A folder of adapter folders: each loads on first use, under its folder name.")] = None,
    max_loaded: Annotated[int, typer.Option(help="Adapters attached at once; the least recently used goes first.")] = 32,
    max_batch: Annotated[int, typer.Option(help="Requests running together in one batch.")] = 64,
    max_queue: Annotated[int, typer.Option(help="Requests waiting for a place; more are refused with 429.")] = 256,
    prefill_batch: Annotated[int, typer.Option(help="While requests decode, newcomers are prefilled together once "
                                               "this many are ready (or as many as are running); 1: each at once.")] = 4,
    prefill_wait: Annotated[int, typer.Option(help="...or once the oldest newcomer has waited this many decode "
                                              "steps.")] = 4,
    max_body_bytes: Annotated[int, typer.Option(help="Largest request body accepted (413 above).")] = 1 << 20,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16.")] = "float32",
) -> None:
    """Serve MODEL and its adapters over an OpenAI-compatible API (completions, chat, classify)."""
    with fail_cleanly({"max_loaded": "--max-loaded"}):
        try:
            import uvicorn
            import fastapi  # noqa: F401
        except ImportError:
            raise ValueError("deltatune serve needs FastAPI and uvicorn: pip install 'deltatune[serve]'") from None
        import torch

        from deltatune.cli.predict import _named_dirs
        from deltatune.serve import Limits, Server, load_served
        from deltatune.serve.loading import base_mismatch

        dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
        if dtype not in dtypes:
            raise ValueError(f"--dtype must be one of {', '.join(dtypes)}; got {dtype!r}")
        if adapter_dir is not None and not adapter_dir.is_dir():
            raise ValueError(f"--adapter-dir {adapter_dir} is not a directory")
        if max_loaded < 1 or max_batch < 1 or max_queue < 0 or prefill_batch < 1 or prefill_wait < 0:
            raise ValueError("--max-loaded, --max-batch and --prefill-batch must be at least 1, --max-queue and "
                             "--prefill-wait at least 0")
        named = _named_dirs(adapter or [])
        where = torch.device("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else torch.device(device)
        served = load_served(model, named, where, dtypes[dtype])
        server = Server(served, named, adapter_dir, max_loaded=max_loaded, max_batch=max_batch, max_queue=max_queue,
                        limits=Limits(max_body=max_body_bytes), prefill_batch=prefill_batch, prefill_wait=prefill_wait)
        for path in {**served.adapters, **named, **{n: adapter_dir / n for n in server.pool.names()
                                                    if adapter_dir is not None and n not in named}}.values():
            warning = base_mismatch(path, served)
            if warning:
                typer.echo(f"warning: {warning}", err=True)
        base = "" if served.quantize == "none" else f", {served.quantize} base"
        typer.echo(f"serving {served.name} ({served.kind}{base}) and {len(server.pool.names())} adapters on "
                   f"http://{host}:{port}")
    uvicorn.run(server.app(), host=host, port=port, log_level="warning")
