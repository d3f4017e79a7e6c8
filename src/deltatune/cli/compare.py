"""``deltatune compare --methods full,lora,bitfit [--task ...] [--set ...] --output DIR``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from deltatune.cli.common import fail_cleanly


def compare(
    methods: Annotated[str, typer.Option(
        "--methods", "-m", help="Comma-separated methods (e.g. full,lora,dora,ia3,bitfit), or 'all'.")],
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Directory for compare.json/.md/.png and one run folder per method "
                               "(default: runs/compare-<task>).")] = None,
    task: Annotated[str | None, typer.Option(help="Task for every method (default: sentiment).")] = None,
    model: Annotated[str | None, typer.Option(help="Base model for every method (default: the task's).")] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Override a key for every run, e.g. --set epochs=1 --set data.max_train_examples=2000 "
                      "(adapter.* keys go to every adapter method).")] = None,
    set_method: Annotated[list[str] | None, typer.Option(
        "--set-method", help="Override a key for one method, e.g. --set-method lora.adapter.rank=16 "
                             "or --set-method bitfit.lr=3e-3 (repeatable).")] = None,
    isolate: Annotated[bool, typer.Option(
        "--isolate/--in-process", help="Train each method in a fresh process, so peak memory is per method.")] = True,
    keep_checkpoints: Annotated[bool, typer.Option(help="Keep each run's resume checkpoint.")] = False,
    grid: Annotated[bool, typer.Option(
        help="Also run each method with each setting of its search space changed in turn (as plan and tune see it).")] = False,
) -> None:
    """Train several methods on the same task, split and budget, then print and save their comparison.

    Reports test accuracy, macro-F1, trainable parameters, adapter bytes, train time and peak memory
    per method, with full fine-tuning as the reference row. A method that fails is a row with its error.
    """
    with fail_cleanly():
        from deltatune.train.compare import run_comparison
        from deltatune.train.compare_report import markdown_table

        overrides = [*([f"task={task}"] if task else []), *([f"model={model}"] if model else []), *(set_ or [])]
        if output is None:
            output = Path("runs") / f"compare-{task or 'sentiment'}"
        result = run_comparison(methods, output, overrides, set_method or [], isolate=isolate,
                                keep_checkpoints=keep_checkpoints, grid=grid)
        typer.echo("")
        typer.echo(markdown_table(result))
        typer.echo(f"wrote {output / 'compare.json'}, {output / 'compare.md'} and {output / 'compare.png'}")
        if all(r["status"] != "ok" for r in result["rows"]):
            typer.secho("error: every method failed; see the note column and each run's log.txt",
                        err=True, fg=typer.colors.RED)
            raise typer.Exit(1)
