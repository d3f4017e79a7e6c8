"""Adapter files: deltatune's format (:mod:`.native`) and Hugging Face PEFT's (:mod:`.peft`).

Each format is a module with ``detect(directory) -> bool``, ``read(directory) -> StoredAdapter``
and ``write(value, directory)``; the value (:class:`deltatune.core.stored.StoredAdapter`) is the
only thing they share. The public verbs are written once here, over that value::

    save_adapter    capture(model, name)          -> <format>.write
    load_adapter    <detected format>.read        -> install(model, value, ...)
    hotswap_adapter <detected format>.read        -> hotswap.swap_in(model, value, name)
    convert         <detected format>.read        -> <other format>.write

so checking keys and shapes, rolling back, and choosing a format each happen in one place. Why the
formats sit above ``methods``: reading a file means turning a config dict into a config object
(``methods.config_from_dict``), which core must not do (it never names a method).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from torch import nn

from deltatune.core.files import CONFIG_FILE, read_json_file
from deltatune.core.hotswap import swap_in
from deltatune.core.stored import StoredAdapter, capture, install
from deltatune.formats import native, peft

FORMATS = ("deltatune", "peft")

__all__ = ["FORMATS", "convert", "detect", "hotswap_adapter", "load_adapter", "load_adapters", "read",
           "read_adapter_config", "save_adapter", "write"]


def detect(directory: str | os.PathLike[str]) -> str:
    """``"peft"`` or ``"deltatune"``: which format ``directory`` holds (its config file is read and
    checked to be a JSON object; anything that is not PEFT's is read as ours, which names what is wrong)."""
    meta = read_json_file(Path(directory) / CONFIG_FILE)
    return "peft" if peft.is_peft_config(meta) else "deltatune"


def read(directory: str | os.PathLike[str], model: nn.Module | None = None) -> StoredAdapter:
    """The adapter in ``directory``, in whichever format, as a value. ``model`` (optional) helps
    PEFT's reader where the files alone leave something open."""
    return peft.read(directory, model) if detect(directory) == "peft" else native.read(directory)


def write(value: StoredAdapter, directory: str | os.PathLike[str], format: str = "deltatune", *,
          model: nn.Module | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Write ``value`` in ``format`` (replaced atomically). Returns the directory."""
    check_format(format, extra)
    if format == "peft":
        return peft.write(value, directory, model)
    return native.write(value, directory, extra)


def check_format(format: str, extra: dict[str, Any] | None = None) -> None:
    """Refuse an unknown format, or ``extra`` metadata for PEFT, before any work."""
    if format not in FORMATS:
        raise ValueError(f"format must be 'deltatune' or 'peft', got {format!r}")
    if format == "peft" and extra:
        raise ValueError("extra metadata has no place in a PEFT config; write it to a file beside the adapter")


def save_adapter(model: nn.Module, directory: str | os.PathLike[str], name: str = "default",
                 extra: dict[str, Any] | None = None, format: str = "deltatune") -> Path:
    """Write adapter ``name`` to ``directory`` (replaced atomically). Returns the directory.

    ``format="peft"`` writes Hugging Face PEFT's checkpoint format instead.
    """
    check_format(format, extra)
    return write(capture(model, name), directory, format, model=model, extra=extra)


def read_adapter_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The adapter's ``adapter_config.json`` as deltatune's meta (a PEFT file is translated), checked."""
    if detect(directory) == "peft":
        return peft.read_peft_meta(directory)
    return native.read_meta(directory)


def load_adapter(model: nn.Module, directory: str | os.PathLike[str], name: str | None = None, *,
                 activate: bool = True, trainable: bool = False) -> str:
    """Attach the adapter saved in ``directory`` (either format) to ``model`` and load its tensors.

    Every module, key and shape is checked against the model before the model keeps anything; the
    first mismatch raises an error naming it (in the file's own key names). Returns the adapter name used.
    """
    return install(model, read(directory, model), name, activate=activate, trainable=trainable)


def load_adapters(model: nn.Module, directories: Mapping[str, str | os.PathLike[str]]) -> list[str]:
    """Load several saved adapters onto one base, by name, leaving the active choice unchanged."""
    from deltatune.core.records import configs

    for name in directories:
        if name in configs(model):
            raise ValueError(f"an adapter named {name!r} is already attached; delete_adapter it or rename")
    return [load_adapter(model, path, name, activate=False) for name, path in directories.items()]


def hotswap_adapter(model: nn.Module, directory: str | os.PathLike[str], name: str) -> None:
    """Overwrite adapter ``name``'s weights, in place, with the adapter saved in ``directory``
    (either format); see :mod:`deltatune.core.hotswap`."""
    from deltatune.core.records import known

    known(model, name)
    swap_in(model, read(directory, model), name)


def convert(src: str | os.PathLike[str], dst: str | os.PathLike[str], to: Literal["peft", "deltatune"]) -> Path:
    """Convert an adapter directory between deltatune's format and PEFT's, without loading a model."""
    src = Path(src)
    if to not in FORMATS:
        raise ValueError(f"--to must be 'peft' or 'deltatune', got {to!r}")
    source = detect(src)
    if source == to:
        raise ValueError(f"{src} is already a {to} adapter; nothing to convert")
    return write(read(src), dst, to)
