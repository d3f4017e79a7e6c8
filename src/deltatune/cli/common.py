"""Helpers shared by the command modules."""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import typer


@contextlib.contextmanager
def fail_cleanly(words: Mapping[str, str] | None = None) -> Iterator[None]:
    """Turn a ``ValueError`` (bad input, with the fix in its message) into one red line and exit code 2.

    ``words`` rewrites the library's argument names in the message into what the user typed
    (``{"heads_from": "--heads-from"}``), so an error raised by the library names the CLI's flag.
    Other exceptions keep their traceback: they are bugs, not user errors.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    original = warnings.formatwarning
    warnings.formatwarning = _one_line_warning  # our warnings read as "warning: ..." lines, like errors
    try:
        yield
    except (ValueError, FileNotFoundError) as err:
        typer.secho(f"error: {in_cli_words(str(err), words or {})}", err=True, fg=typer.colors.RED)
        raise typer.Exit(2) from None
    finally:
        warnings.formatwarning = original


_PACKAGE = str(Path(__file__).resolve().parents[1])


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                      line: str | None = None) -> str:
    """deltatune's own warnings as one line; others (from torch, transformers) as Python prints them."""
    if str(Path(filename).resolve()).startswith(_PACKAGE):
        return f"warning: {message}\n"
    return _PYTHON_FORMAT(message, category, filename, lineno, line)


_PYTHON_FORMAT = warnings.formatwarning


def in_cli_words(message: str, words: Mapping[str, str]) -> str:
    """``message`` with each whole-word key of ``words`` replaced (longest first; not inside
    ``low-rank`` or ``--rank``, and not a library name: ``deltatune.quantize(model)`` stays)."""
    for key in sorted(words, key=len, reverse=True):
        message = re.sub(rf"(?<![\w.-]){re.escape(key)}(?![\w(-])", lambda _: words[key], message)
    return message


def parse_sets(values: list[str] | None) -> dict:
    """``--set`` assignments as a nested dict (``a.b=1`` -> ``{"a": {"b": 1}}``)."""
    from deltatune.train.config import apply_override

    data: dict = {}
    for assignment in values or []:
        apply_override(data, assignment)
    return data


def check_output_file(output: Path, example: str, inputs: Iterable[Path] = (), flag: str = "--output") -> None:
    """Refuse, before any work, an output file that cannot be written (a directory) or that is one of
    the inputs (the results would replace the data they came from)."""
    if output.is_dir():
        raise ValueError(f"{flag} {output} is a directory; give a file path, e.g. {output / example}")
    for given in inputs:
        if output.exists() and Path(given).exists() and output.samefile(given):
            raise ValueError(f"{flag} {output} is the input file {given}; write the results to another file")


def task_named(overrides: list[str]) -> str:
    """The task the overrides pick (``task=...`` from --task or --set, the last one winning), else the default."""
    return str(parse_sets(overrides).get("task") or "sentiment")


def check_apart(output: Path, inputs: Iterable[Path], flag: str = "--output") -> None:
    """Refuse an output directory that is, holds or sits inside one of the inputs: writing it would
    replace what is being read."""
    out = output.resolve()
    for given in inputs:
        src = Path(given).resolve()
        if out == src or src in out.parents or out in src.parents:
            raise ValueError(f"{flag} {output} overlaps the input {given}; write the result to a separate directory")
