"""``deltatune serve``: many adapters on one base model behind an OpenAI-compatible HTTP API.

- :mod:`.loading`  what MODEL names (built-in, directory, training run) and what it answers;
- :mod:`.adapters` known / in host memory / attached adapters, LRU eviction, on-demand loading;
- :mod:`.engine`   the engine thread: continuous batching with per-example adapter routing;
- :mod:`.kv`       the running batch's left-padded key/value cache (rows join and leave);
- :mod:`.app`      FastAPI endpoints (OpenAI's and vLLM's adapter endpoints), errors, streaming;
- :mod:`.metrics`  Prometheus text exposition.

FastAPI and uvicorn are the ``serve`` extra, imported where used.
"""

from deltatune.serve.app import Limits, Server
from deltatune.serve.loading import Served, load_served

__all__ = ["Limits", "Served", "Server", "load_served"]
