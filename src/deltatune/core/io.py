"""Save and load adapters: ``adapter_config.json`` + ``adapter_model.safetensors``.

The tensor file holds only adapter tensors (and ``modules_to_save`` copies), keyed
``<module name>.<tensor name inside the adapter>``, e.g. ``encoder.layer.0.attention.self.query.A``.
The JSON file records the method config and the exact module names, so loading re-creates the
adapter on the same modules and checks every key and shape before copying anything.

Nothing is ever unpickled: tensors come from safetensors, everything else from JSON.
Saving is atomic: files are written to a sibling temporary directory, which then replaces the
target with renames, so a crash mid-save leaves the previous save intact.

Nothing is lost: every directory deltatune writes this way lists its files in ``MANIFEST``, and a
save replaces only a directory that is absent, empty, or holds nothing but what deltatune wrote
there; any other file makes it refuse, naming the file. Temporary names follow one pattern
(``.<name>.tmp-<pid>-<hex>``, ``.<name>.old-<pid>-<hex>``) so the next save removes leftovers of a
dead process, and only those. Directories and files follow the umask.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from deltatune.config import HybridConfig
from deltatune.core.fingerprint import differences, fingerprint
from deltatune.core.inject import adapted_layers, attach, configs, placement
from deltatune.core.layer import FullCopy

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
FORMAT = "deltatune"
FORMAT_VERSION = 1


MANIFEST = ".deltatune-files.json"  # in every directory atomic_directory writes: the names it wrote
_LEGACY_ADAPTER_FILES = {CONFIG_FILE, WEIGHTS_FILE, "deltatune_training.json"}  # saves from before MANIFEST
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-[0-9a-f]{8}$")
_crossed: dict[str, int] = {}


def crash_point(name: str) -> None:
    """For tests: ``DELTATUNE_TEST_CRASH_AT=<name>[@<n>][:STOP]`` SIGKILLs (or SIGSTOPs) this process
    the n-th time it passes ``name`` (e.g. ``checkpoint-swap@2``). The one place that reads it."""
    spec = os.environ.get("DELTATUNE_TEST_CRASH_AT")
    if not spec:
        return
    where, _, how = spec.partition(":")
    point, _, nth = where.partition("@")
    if point != name:
        return
    _crossed[name] = _crossed.get(name, 0) + 1
    if _crossed[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGSTOP if how == "STOP" else signal.SIGKILL)


def foreign_entries(path: str | os.PathLike[str]) -> list[str]:
    """Names in directory ``path`` that deltatune did not write there (none if ``path`` is absent)."""
    path = Path(path)
    if not path.is_dir():
        return [path.name] if path.exists() else []
    names = sorted(p.name for p in path.iterdir())
    own: set[str] = set()
    if (path / MANIFEST).is_file():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            own = {MANIFEST, *json.loads((path / MANIFEST).read_text())["files"]}
    elif set(names) <= _LEGACY_ADAPTER_FILES and (path / CONFIG_FILE).is_file():
        with contextlib.suppress(ValueError):
            if json.loads((path / CONFIG_FILE).read_text()).get("format") == FORMAT:
                own = _LEGACY_ADAPTER_FILES
    return [n for n in names if n not in own]


def check_replaceable(path: str | os.PathLike[str]) -> None:
    """Refuse to replace ``path`` if it holds anything deltatune did not write there."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} is a file; give a directory path for the output")
    foreign = foreign_entries(path)
    if foreign:
        raise ValueError(f"{path} holds files deltatune did not write (e.g. {foreign[0]!r}), which saving there "
                         "would delete; choose a new or empty directory, or move them out first")


def temp_dir(final: Path, kind: str = "tmp") -> Path:
    """A new, empty sibling of ``final`` named ``.<name>.<kind>-<pid>-<hex>`` (mode from the umask)."""
    while True:
        tmp = final.with_name(f".{final.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            tmp.mkdir()  # unlike mkdtemp's 0700, follows the umask
            return tmp
        except FileExistsError:
            continue


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_leftovers(parent: str | os.PathLike[str]) -> None:
    """Remove the temporary directories a dead deltatune process left in ``parent`` (by their name
    pattern only); an ``.old-`` copy whose target is missing (killed mid-swap) is put back instead."""
    parent = Path(parent)
    if not parent.is_dir():
        return
    for entry in sorted(parent.iterdir()):
        m = _TEMP.match(entry.name)
        if not m or _alive(int(m["pid"])):
            continue
        target = parent / m["name"]
        if m["kind"] == "old" and entry.is_dir() and not target.exists():
            os.replace(entry, target)
        elif entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)  # a write_text_atomic file


def umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        status = Path("/proc/self/status").read_text().splitlines()
        return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def seal_tree(root: Path) -> None:
    """Before a rename publishes ``root``: give everything under it the umask's ordinary modes (some
    writers, safetensors among them, create 0600 files) and make its bytes durable."""
    mask = umask()
    for dirpath, _, files in os.walk(root):
        for f in files:
            path = os.path.join(dirpath, f)
            os.chmod(path, 0o666 & ~mask)
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
        os.chmod(dirpath, 0o777 & ~mask)
        fsync_dir(Path(dirpath))


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform can open a directory
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``path`` only if the block completes.

    ``path`` must be absent, empty, or hold only what deltatune wrote there (see ``MANIFEST``);
    otherwise this raises before writing anything.
    """
    final = Path(path)
    check_replaceable(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(final.parent)
    tmp = temp_dir(final)
    try:
        yield tmp
        from deltatune import __version__

        write_json(tmp / MANIFEST, {"written_by": f"deltatune {__version__}",
                                    "files": sorted(p.name for p in tmp.iterdir() if p.name != MANIFEST)})
        seal_tree(tmp)
        check_replaceable(final)  # again: someone may have put a file there meanwhile
        if final.exists():
            old = temp_dir(final, "old")
            os.replace(final, old)  # onto the empty placeholder temp_dir reserved
            crash_point("save-swap")  # killed here: the next save or start puts .old- back
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(final.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Write a file through a temporary sibling and a rename: readers see the old or the new text."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        tmp.write_text(text)
        os.chmod(tmp, 0o666 & ~umask())
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def adapter_state(model: nn.Module, name: str) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """The adapter's tensors by saved key, plus its target and modules_to_save module names."""
    tensors: dict[str, torch.Tensor] = {}
    targets: list[str] = []
    saved: list[str] = []
    for layer_name, layer in adapted_layers(model):
        if name not in layer.adapters:
            continue
        adapter = layer.adapters[name]
        (saved if isinstance(adapter, FullCopy) else targets).append(layer_name)
        for key, t in adapter.state_dict().items():
            tensors[f"{layer_name}.{key}"] = t.detach().to("cpu").contiguous()
    return tensors, targets, saved


def adapter_payload(model: nn.Module, name: str, extra: dict[str, Any] | None = None
                    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """What ``save_adapter`` writes for adapter ``name``: the JSON meta and the tensors by saved key."""
    if name not in configs(model):
        have = ", ".join(repr(n) for n in configs(model)) or "none"
        raise ValueError(f"no adapter named {name!r} to save (attached: {have})")
    for layer_name, layer in adapted_layers(model):
        if name in layer.merged:
            raise RuntimeError(f"adapter {name!r} is merged into {layer_name!r}; unmerge(model) before saving it")
    tensors, targets, saved = adapter_state(model, name)
    from deltatune import __version__

    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "deltatune_version": __version__,
        "adapter_name": name,
        "config": configs(model)[name].to_dict(),
        "targets": targets,
        "modules_to_save": saved,
        # The base layer types (e.g. Linear, Embedding), so converters to other formats, which name
        # tensors per layer type, work from the files alone.
        "module_types": {n: type(layer.base).__name__ for n, layer in adapted_layers(model) if n in targets},
        # Shapes and a hash of a few base weights, so loading onto another base can warn (fingerprint.py).
        "base_fingerprint": fingerprint({n: layer.base for n, layer in adapted_layers(model) if n in targets}),
        **({"part_targets": placement(model, name)} if isinstance(configs(model)[name], HybridConfig) else {}),
        **(extra or {}),
    }
    return meta, tensors


def save_adapter(model: nn.Module, directory: str | os.PathLike[str], name: str = "default",
                 extra: dict[str, Any] | None = None, format: str = "deltatune") -> Path:
    """Write adapter ``name`` to ``directory`` (replaced atomically). Returns the directory.

    ``format="peft"`` writes Hugging Face PEFT's checkpoint format instead (see
    :mod:`deltatune.integrations.peft_format`, imported only then).
    """
    if format not in (FORMAT, "peft"):
        raise ValueError(f"format must be {FORMAT!r} or 'peft', got {format!r}")
    if format == "peft":
        if extra:
            raise ValueError("extra metadata has no place in a PEFT config; write it to a file beside the adapter")
        from deltatune.integrations.peft_format import save_peft_adapter

        return save_peft_adapter(model, directory, name)
    meta, tensors = adapter_payload(model, name, extra)
    with atomic_directory(directory) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        write_json(tmp / CONFIG_FILE, meta)
    return Path(directory)


def read_json_file(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; anything else (bad JSON, a list, unreadable bytes) is one
    ``ValueError`` naming the file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; expected an adapter directory (adapter_config.json + "
                                "adapter_model.safetensors)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); the file is damaged: save the adapter again") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, not a {type(data).__name__}")
    return data


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, each checked to be finite. A missing, truncated or empty
    file, or a NaN/inf value, is one ``ValueError`` naming the file (and the tensor)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; the adapter directory is incomplete")
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty (0 bytes); the save was interrupted: save the adapter again")
    try:
        tensors = load_file(str(path), device="cpu")
    except Exception as err:  # safetensors' own error type (truncated header or data)
        raise ValueError(f"{path} is not a readable safetensors file ({err}); it is probably truncated: "
                         "save the adapter again") from None
    check_finite(tensors, path)
    return tensors


def check_finite(tensors: dict[str, torch.Tensor], path: Path | str) -> None:
    for key, t in tensors.items():
        if t.is_floating_point() or t.is_complex():
            bad = ~torch.isfinite(t)
            if bad.any():
                kind = "NaN" if torch.isnan(t).any() else "inf"
                raise ValueError(f"{path}: tensor {key!r} holds {int(bad.sum())} {kind} value(s) of {t.numel()}; "
                                 "the adapter diverged in training or the file is damaged")


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


def read_adapter_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(directory) / CONFIG_FILE
    meta = read_json_file(path)
    if _is_peft(meta):  # a Hugging Face PEFT checkpoint: read as ours
        from deltatune.integrations.peft_format import read_peft_meta

        return read_peft_meta(directory)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a deltatune adapter (format {meta.get('format')!r})")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path} was written by a newer deltatune (format {meta['format_version']}); upgrade deltatune")
    lists = {"targets": meta.get("targets"), "modules_to_save": meta.get("modules_to_save", []),
             **{f"part_targets[{i}]": p for i, p in enumerate(meta.get("part_targets") or [])}}
    for key, names in lists.items():
        if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
            raise ValueError(f"{path}: {key!r} must be a list of module names, got {names!r}")
    config_from_meta(meta, path)  # checked here, so every reader of the meta gets a sound config
    return meta


def load_adapter(model: nn.Module, directory: str | os.PathLike[str], name: str | None = None, *,
                 activate: bool = True, trainable: bool = False) -> str:
    """Attach the adapter saved in ``directory`` to ``model`` and load its tensors.

    Every module, key and shape is checked against the model before anything is copied; the
    first mismatch raises an error naming it. Returns the adapter name used.
    """
    path = Path(directory) / CONFIG_FILE
    if _is_peft(read_json_file(path)):
        # A Hugging Face PEFT checkpoint: its own loader, which names PEFT's keys in errors.
        from deltatune.integrations.peft_format import load_peft_adapter

        return load_peft_adapter(model, directory, name, activate=activate, trainable=trainable)
    meta = read_adapter_config(directory)
    config = config_from_meta(meta, path)
    name = name or meta.get("adapter_name", "default")
    tensors = read_tensors(Path(directory) / WEIGHTS_FILE)
    attach(model, config, name, activate=activate, part_names=meta.get("part_targets", [meta["targets"]]),
           save_names=meta.get("modules_to_save", []))
    try:
        expected, _, _ = adapter_state(model, name)
        for key in expected:
            if key not in tensors:
                raise ValueError(f"{directory}: tensor {key!r} is missing from {WEIGHTS_FILE}")
            if tuple(tensors[key].shape) != tuple(expected[key].shape):
                raise ValueError(
                    f"{directory}: tensor {key!r} has shape {tuple(tensors[key].shape)} but this model "
                    f"needs {tuple(expected[key].shape)}; the adapter was trained on a different base model"
                )
        for key in tensors:
            if key not in expected:
                raise ValueError(f"{directory}: unexpected tensor {key!r} in {WEIGHTS_FILE}")
        _copy_in(model, name, tensors)
    except Exception:
        from deltatune.core.inject import detach

        detach(model, name)
        raise
    changed = differences(meta.get("base_fingerprint"),
                          {n: layer.base for n, layer in adapted_layers(model) if name in layer.adapters})
    if changed:
        more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
        warnings.warn(f"{directory}: this base model is not the one the adapter was saved with: {changed[0]}{more}; "
                      "it loads, but its outputs will differ from the trained run's", stacklevel=2)
    finish_load(model, name, activate=activate, trainable=trainable)
    return name


def finish_load(model: nn.Module, name: str, *, activate: bool, trainable: bool) -> None:
    """After a load: only ``name`` trains if ``trainable``; an activated inference load freezes all."""
    from deltatune.core.inject import mark_trainable

    if trainable:
        mark_trainable(model, [name])
    elif activate:
        for p in model.parameters():
            p.requires_grad_(False)


def _is_peft(meta: dict[str, Any]) -> bool:
    return "peft_type" in meta and "format" not in meta


def _copy_in(model: nn.Module, name: str, tensors: dict[str, torch.Tensor]) -> None:
    for layer_name, layer in adapted_layers(model):
        if name not in layer.adapters:
            continue
        adapter = layer.adapters[name]
        own = {key: tensors[f"{layer_name}.{key}"] for key in adapter.state_dict()}
        adapter.load_state_dict(own, strict=True)
