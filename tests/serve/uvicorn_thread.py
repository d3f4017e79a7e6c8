"""A :class:`deltatune.serve.Server` on uvicorn in a thread, for tests that talk to it over HTTP.

A module of its own (no httpx import) so that tests needing only the ``openai`` client share it.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(server: Any, start_s: float = 60) -> Iterator[str]:
    """``server`` on uvicorn in a thread; yields its base URL and stops it afterwards."""
    import uvicorn

    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(server.app(), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.time() + start_s
    while not uv.started:
        assert thread.is_alive() and time.time() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        uv.should_exit = True
        thread.join(timeout=10)
