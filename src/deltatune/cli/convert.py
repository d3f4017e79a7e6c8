"""``deltatune convert SRC DST --to peft|deltatune``: rewrite an adapter in the other checkpoint format."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from deltatune.cli.common import check_apart, fail_cleanly


def convert(
    src: Annotated[Path, typer.Argument(help="An adapter directory (deltatune or Hugging Face PEFT format), or a run directory.")],
    dst: Annotated[Path, typer.Argument(help="Where to write the converted adapter (a deltatune save there is replaced).")],
    to: Annotated[str, typer.Option("--to", help="Target format: 'peft' (Hugging Face PEFT) or 'deltatune'.")],
) -> None:
    """Convert an adapter between deltatune's format and Hugging Face PEFT's, without loading a model.

    A PEFT directory needs no conversion to be used here: train, eval, predict and merge read it
    as it is. Convert to share an adapter with PEFT, vLLM, SGLang and other tools that read PEFT's format.
    """
    with fail_cleanly():
        from deltatune.formats import convert as convert_dir

        if to not in ("peft", "deltatune"):
            raise ValueError(f"--to must be 'peft' or 'deltatune', got {to!r}")
        if not (src / "adapter_config.json").is_file() and (src / "adapter" / "adapter_config.json").is_file():
            src = src / "adapter"  # a run directory, as eval, predict, merge and combine take it
        check_apart(dst, [src], flag="DST")
        fmt: Literal["peft", "deltatune"] = "peft" if to == "peft" else "deltatune"
        convert_dir(src, dst, to=fmt)
        typer.echo(f"wrote {dst} ({to} format) from {src}")
