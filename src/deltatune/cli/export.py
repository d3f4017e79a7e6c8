"""``deltatune export RUN --format onnx|gguf --output PATH [--quantize int8]`` and ``deltatune export --list [RUN ...]``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from deltatune.cli.common import check_apart, fail_cleanly, parse_sets

FORMATS = ("onnx", "gguf")


def export(
    runs: Annotated[list[Path] | None, typer.Argument(
        help="A run directory, its adapter/ folder, or a merged model (with --list: any number).")] = None,
    format: Annotated[str | None, typer.Option("--format", "-f", help="onnx (merged model) or gguf (llama.cpp LoRA adapter).")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="onnx: a directory; gguf: a .gguf file.")] = None,
    quantize: Annotated[str | None, typer.Option(
        "--quantize", help="onnx only: int8 (ONNX Runtime: dynamic for transformers, static calibrated QDQ "
                           "for image models; test split scored before and after).")] = None,
    list_: Annotated[bool, typer.Option("--list", help="Say which formats apply to which runs (and why not).")] = False,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Change the recorded config, e.g. --set data.max_eval_examples=500.")] = None,
) -> None:
    """Export a trained run for deployment: ONNX (optionally int8) or a llama.cpp GGUF LoRA adapter."""
    with fail_cleanly({"quantize": "--quantize", "output": "--output"}):
        if list_:
            from deltatune.export.formats import describe

            typer.echo(describe(runs or [], parse_sets(set_)))
            return
        if not runs or len(runs) != 1:
            raise ValueError("give one run to export (or --list to see which formats apply to which runs)")
        if format not in FORMATS:
            raise ValueError(f"--format takes {' or '.join(FORMATS)}" + (f", not {format!r}" if format else ""))
        if output is None:
            raise ValueError("--output is needed: a directory for onnx, a .gguf file for gguf")
        run = runs[0]
        from deltatune.train.models import find_trained

        check_apart(output, [find_trained(run)[1]])
        if format == "onnx":
            from deltatune.export.onnx import export_onnx

            facts = export_onnx(run, output, quantize, parse_sets(set_), say=typer.echo)
            sizes = ", ".join(f"{name} {size / 2**20:.1f} MiB" for name, size in facts["files"].items())
            typer.echo(f"wrote {output}: {sizes}")
        else:
            if quantize is not None:
                raise ValueError("--quantize applies to --format onnx; a GGUF adapter is written in float32")
            from deltatune.export.gguf import export_gguf

            facts = export_gguf(run, output, parse_sets(set_), say=typer.echo)
            typer.echo(f"wrote {output}: {facts['tensors']} tensors, {facts['bytes'] / 2**20:.2f} MiB")
