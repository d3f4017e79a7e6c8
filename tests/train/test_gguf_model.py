"""A GGUF file as ``model:``: converted once into the cache (keyed by path, size and time), then reused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from deltatune.train import models


def test_a_gguf_file_converts_once_into_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "My-Model.Q4_K.gguf"
    gguf.write_bytes(b"GGUF")
    calls: list[tuple[Path, Path]] = []

    def fake_convert(source: Path, target: Path) -> Path:  # the real one dequantizes with transformers
        calls.append((source, target))
        target.mkdir(parents=True)
        (target / "config.json").write_text("{}")
        return target

    monkeypatch.setattr(models, "convert_gguf", fake_convert)
    first = models.resolve_model(str(gguf))
    assert first.parent == tmp_path / "cache" / "gguf" and first.name.startswith("My-Model.Q4_K-")
    assert models.resolve_model(str(gguf)) == first and len(calls) == 1  # cached
    os.utime(gguf, ns=(1, 1))  # a changed file converts again
    assert models.resolve_model(str(gguf)) != first and len(calls) == 2
    with pytest.raises(ValueError, match=r"nor a \.gguf file"):
        models.resolve_model(str(tmp_path / "missing.gguf"))


def test_a_file_transformers_cannot_read_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("gguf")
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "broken.gguf"
    gguf.write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match=r"broken.gguf: transformers cannot read this GGUF file"):
        models.resolve_model(str(gguf))
    assert not any((tmp_path / "cache" / "gguf").glob("*/config.json"))
