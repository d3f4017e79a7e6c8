"""Files deltatune writes and reads, whatever they hold: atomic directories, their manifest,
crash points for tests, and the checked readers of JSON and safetensors files.

Method- and format-agnostic: the adapter formats (:mod:`deltatune.formats`) and the training
outputs (:mod:`deltatune.train`) both write through :func:`atomic_directory` and read through
:func:`read_json_file` / :func:`read_tensors`. Nothing is ever unpickled: tensors come from
safetensors, everything else from JSON.

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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from deltatune._version import __version__

# The two files of an adapter directory, in deltatune's format and PEFT's alike.
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
FORMAT = "deltatune"  # the "format" field of our adapter_config.json: how legacy saves are recognised


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
