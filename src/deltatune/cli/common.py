"""Helpers shared by the command modules."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import typer


@contextlib.contextmanager
def fail_cleanly() -> Iterator[None]:
    """Turn a ``ValueError`` (bad input, with the fix in its message) into one red line and exit code 2.

    Other exceptions keep their traceback: they are bugs, not user errors.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        yield
    except (ValueError, FileNotFoundError) as err:
        typer.secho(f"error: {err}", err=True, fg=typer.colors.RED)
        raise typer.Exit(2) from None


def parse_sets(values: list[str] | None) -> dict:
    """``--set`` assignments as a nested dict (``a.b=1`` -> ``{"a": {"b": 1}}``)."""
    from deltatune.train.config import apply_override

    data: dict = {}
    for assignment in values or []:
        apply_override(data, assignment)
    return data


def check_apart(output: Path, inputs: Iterable[Path], flag: str = "--output") -> None:
    """Refuse an output directory that is, holds or sits inside one of the inputs: writing it would
    replace what is being read."""
    out = output.resolve()
    for given in inputs:
        src = Path(given).resolve()
        if out == src or src in out.parents or out in src.parents:
            raise ValueError(f"{flag} {output} overlaps the input {given}; write the result to a separate directory")
