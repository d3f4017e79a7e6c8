"""The run directory: whose it is, who is writing it, and what starting afresh may remove.

Nothing is lost. ``deltatune train --output OUT`` starts only in a directory that is new, empty,
or a run deltatune wrote (marked by ``LOCK_FILE``, or, for runs from before it, by ``config.yaml``
beside a checkpoint or results); any other file makes it refuse. A directory holding a run is
continued with ``--resume`` or replaced with ``--overwrite``, which removes only ``RUN_ENTRIES``
(what ``deltatune train`` writes) and leaves every other file where it is.

One writer at a time: the run holds an exclusive ``fcntl.flock`` on ``OUT/LOCK_FILE`` for its
whole life, and writes its PID, host and start time into it, so a second run stops at once naming
the first. The kernel drops the lock when the process ends in any way, ``kill -9`` included, so a
crashed run never leaves the directory stuck. The lock file stays after the run (it marks the
directory as a deltatune run). Under torchrun rank 0 alone takes it: rank 0 alone writes.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import socket
from pathlib import Path

from deltatune.core.files import foreign_entries, remove_leftovers
from deltatune.train.checkpoint import checkpoints, remove_checkpoint

try:
    import fcntl
except ImportError:  # Windows: no flock; runs are then not protected from each other
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = ".deltatune.lock"
RUN_ENTRIES = ("config.yaml", "adapter", "model", "metrics.json", "training.png", "checkpoint", "tensorboard")
# Written into a run directory by `deltatune compare` before the run starts: never foreign, never removed.
COMPARE_ENTRIES = ("log.txt", "compare-result.json")


def _is_run(out: Path) -> bool:
    if (out / LOCK_FILE).is_file():
        return True
    return (out / "config.yaml").is_file() and any((out / n).exists() for n in RUN_ENTRIES[1:])


def survey(out: Path) -> tuple[list[str], list[str]]:
    """(entries an earlier deltatune run wrote in ``out``, entries deltatune did not write)."""
    if not out.is_dir():
        return [], []
    names = sorted(p.name for p in out.iterdir() if p.name not in (LOCK_FILE, *COMPARE_ENTRIES))
    run = _is_run(out)
    ours = [n for n in names if run and n in RUN_ENTRIES]
    return ours, [n for n in names if n not in ours]


class RunLock:
    """An exclusive lock on a run directory, held until :meth:`release` (or the process ends)."""

    def __init__(self, out: Path) -> None:
        self.fd: int | None = None
        if fcntl is None:
            return
        fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)  # mode from the umask
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace")
            os.close(fd)
            raise ValueError(f"{out} is being written by another deltatune run ({_describe(holder)}); wait for "
                             "it to finish or stop it, or choose another --output") from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock; the file stays as the run's mark
            self.fd = None


def _describe(holder: str) -> str:
    try:
        h = json.loads(holder)
        return f"PID {h['pid']} on {h['host']}, started {h['started']}"
    except (ValueError, KeyError, TypeError):
        return "PID unknown: it is just starting"


def claim_output(out: Path, resume: bool, overwrite: bool) -> RunLock:
    """Check that a run may write ``out`` as asked, lock it, and clear dead runs' temporary files."""
    if resume and overwrite:
        raise ValueError("--resume continues the run in the output directory and --overwrite replaces it; pass one")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output {out} is a file; give a directory")
    if resume and not out.is_dir():  # refuse before creating anything
        raise ValueError(f"--resume: {out} holds no checkpoint; run without --resume to start afresh")
    ours, foreign = survey(out)
    if foreign and not ours and not _is_run(out):
        raise ValueError(f"{out} is not empty and deltatune did not write it (it holds {foreign[0]!r}); "
                         "choose a new or empty --output directory")
    out.mkdir(parents=True, exist_ok=True)
    lock = RunLock(out)
    try:
        for where in (out, out / "checkpoint"):
            remove_leftovers(where)
        for artifact in ("adapter", "model"):  # the run ends by replacing these: refuse now, not then
            foreign_inside = foreign_entries(out / artifact)
            if foreign_inside:
                raise ValueError(f"{out / artifact} holds files deltatune did not write (e.g. {foreign_inside[0]!r}), "
                                 "which the run would replace at its end; move them out first")
        ours, _ = survey(out)
        if ours and not resume and not overwrite:
            state = "a finished" if (out / "metrics.json").is_file() else "an unfinished"
            raise ValueError(f"{out} holds {state} deltatune run; continue it with --resume, or replace it "
                             "with --overwrite (which removes only what deltatune wrote there)")
    except BaseException:
        lock.release()
        raise
    return lock


def unclaim_output(out: Path, created: list[Path]) -> None:
    """Take back the lock file from ``out`` if it holds nothing else (the run stopped on bad input before
    writing anything), and the directories this run created for it (``out`` and missing parents such as
    ``runs/``, innermost first) while they are empty. Called while the lock is still held."""
    if {p.name for p in out.iterdir()} == {LOCK_FILE}:
        (out / LOCK_FILE).unlink()
        for directory in created:
            try:
                directory.rmdir()
            except OSError:  # not empty (another run's, or files appeared): it stays, and so do its parents
                break


def check_output_for(out: Path, command: str, own: tuple[str, ...], runs_inside: bool = False) -> None:
    """Refuse ``out`` for ``command`` (plan, tune, compare) if it holds an entry that command does not
    write, before any work: it writes its files there and would replace a same-named file of the
    user's. ``own``: the names it writes; ``runs_inside``: deltatune runs in it are its own too. Our
    own atomic writes' leftovers (``.NAME.tmp-...``) do not count."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output {out} is a file; give a directory")
    if not out.is_dir():
        return
    for entry in sorted(out.iterdir(), key=lambda p: p.name):
        name = entry.name
        if name in own or (runs_inside and entry.is_dir() and _is_run(entry)):
            continue
        if name.startswith(".") and any(name.startswith(f".{o}.") for o in own):
            continue
        raise ValueError(f"{out} holds {name!r}, which deltatune {command} did not write; choose a new or empty "
                         "--output directory (it writes " + ", ".join(own) + " there)")


def remove_run(out: Path) -> list[str]:
    """Remove what an earlier ``deltatune train`` wrote in ``out`` (``--overwrite``), nothing else;
    return the names removed."""
    ours, _ = survey(out)
    for name in ours:
        path = out / name
        if name == "checkpoint":
            for ckpt in checkpoints(path):
                remove_checkpoint(ckpt)
            with contextlib.suppress(OSError):
                path.rmdir()  # only if nothing else is in it
        elif name == "tensorboard":  # the event files a run's TensorBoard callback wrote, nothing else
            for events in path.glob("events.out.tfevents.*"):
                events.unlink()
            with contextlib.suppress(OSError):
                path.rmdir()
        elif path.is_dir():
            _remove_written(path)
        else:
            path.unlink()
    return ours


def _remove_written(directory: Path) -> None:
    """Remove the files ``atomic_directory`` wrote in ``directory`` (its manifest), then it if empty."""
    foreign = set(foreign_entries(directory))
    for entry in directory.iterdir():
        if entry.name in foreign:
            continue
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    with contextlib.suppress(OSError):
        directory.rmdir()
