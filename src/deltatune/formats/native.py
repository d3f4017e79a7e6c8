"""deltatune's own format: ``adapter_config.json`` + ``adapter_model.safetensors``.

The tensor file holds only adapter tensors (and ``modules_to_save`` copies), keyed
``<module name>.<tensor name inside the adapter>``, e.g. ``encoder.layer.0.attention.self.query.A``.
The JSON file records the method config and the exact module names, so loading re-creates the
adapter on the same modules (``core.stored.install`` checks every key and shape before the model
keeps anything).

This file only maps a :class:`~deltatune.core.stored.StoredAdapter` to and from the two files;
writing is atomic through :func:`deltatune.core.files.atomic_directory`. Nothing is unpickled.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from deltatune._version import __version__
from deltatune.core.files import (CONFIG_FILE, FORMAT, WEIGHTS_FILE, atomic_directory, read_json_file, read_tensors,
                                  write_json)
from deltatune.core.stored import Source, StoredAdapter

FORMAT_VERSION = 1
# Meta keys this format writes itself; every other key of a value's meta is written as it is.
_OWN = ("format", "format_version", "deltatune_version", "config", "targets", "modules_to_save", "part_targets")


def detect(directory: str | os.PathLike[str]) -> bool:
    """Whether ``directory``'s ``adapter_config.json`` says it is ours."""
    return read_json_file(Path(directory) / CONFIG_FILE).get("format") == FORMAT


def to_meta(value: StoredAdapter, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """What ``adapter_config.json`` holds for ``value``."""
    meta = dict(value.meta)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "deltatune_version": __version__,
        "adapter_name": meta.pop("adapter_name", "default"),
        "config": value.config.to_dict(),
        "targets": value.targets,
        "modules_to_save": list(value.modules_to_save),
        "module_types": meta.pop("module_types", {}),
        **({"base_fingerprint": meta.pop("base_fingerprint")} if "base_fingerprint" in meta else {}),
        **({"part_targets": value.parts} if len(value.config.parts) > 1 else {}),
        **{k: v for k, v in meta.items() if k not in _OWN},
        **(extra or {}),
    }


def write(value: StoredAdapter, directory: str | os.PathLike[str], extra: dict[str, Any] | None = None) -> Path:
    """Write ``value`` to ``directory`` (replaced atomically); ``extra`` keys go into the JSON."""
    meta = to_meta(value, extra)
    with atomic_directory(directory) as tmp:
        save_file({k: t.contiguous() for k, t in value.tensors.items()}, str(tmp / WEIGHTS_FILE),
                  metadata={"format": "pt"})
        write_json(tmp / CONFIG_FILE, meta)
    return Path(directory)


def read_meta(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """``adapter_config.json``, checked: our format, a version we read, module names as lists of
    strings, and a config that parses (so every reader of the meta gets a sound config)."""
    path = Path(directory) / CONFIG_FILE
    meta = read_json_file(path)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a deltatune adapter (format {meta.get('format')!r})")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path} was written by a newer deltatune (format {meta['format_version']}); upgrade deltatune")
    lists = {"targets": meta.get("targets"), "modules_to_save": meta.get("modules_to_save", []),
             **{f"part_targets[{i}]": p for i, p in enumerate(meta.get("part_targets") or [])}}
    for key, names in lists.items():
        if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
            raise ValueError(f"{path}: {key!r} must be a list of module names, got {names!r}")
    config_from_meta(meta, path)
    return meta


def config_from_meta(meta: dict[str, Any], path: Path | str) -> Any:
    """The adapter config recorded in ``meta``; a bad one is a ``ValueError`` naming ``path``."""
    from deltatune.methods import config_from_dict

    config = meta.get("config")
    if not isinstance(config, dict):
        raise ValueError(f"{path}: 'config' must be a JSON object with a 'method' key, got {config!r}")
    try:
        return config_from_dict(config)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{path}: {err}") from None


def from_meta(meta: dict[str, Any], tensors: dict[str, Any], source: Source | None = None) -> StoredAdapter:
    """A value from our meta (as :func:`read_meta` returns it, or PEFT's reader builds it) and tensors."""
    config = config_from_meta(meta, source.where if source else "adapter")
    parts = meta.get("part_targets") or [meta["targets"]]
    rest = {k: v for k, v in meta.items() if k not in _OWN}
    return StoredAdapter(config, [list(p) for p in parts], list(meta.get("modules_to_save", [])), tensors, rest,
                         source)


def read(directory: str | os.PathLike[str]) -> StoredAdapter:
    """The adapter in ``directory`` as a value (config checked, every tensor finite)."""
    meta = read_meta(directory)
    tensors = read_tensors(Path(directory) / WEIGHTS_FILE)
    return from_meta(meta, tensors, Source(str(directory)))
