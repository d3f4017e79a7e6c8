"""Where models built once are kept: ``$DELTATUNE_CACHE`` or ``~/.cache/deltatune``.

Used by the SmolLM2 conversion (``models.py``) and the pretrained recommender (``sasrec.py``)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Where converted models are kept: ``$DELTATUNE_CACHE`` or ``~/.cache/deltatune``."""
    return Path(os.environ.get("DELTATUNE_CACHE", Path.home() / ".cache" / "deltatune"))
