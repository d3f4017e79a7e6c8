"""``deltatune plan [MODEL] [--task ...] [--set ...] [--budget memory=4GB,time=10m,adapter=5MB,params=1%]``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from deltatune.cli.common import fail_cleanly, task_named


def plan(
    model: Annotated[str | None, typer.Argument(help="Base model: a built-in name or a directory (default: the task's).")] = None,
    task: Annotated[str | None, typer.Option(help="Task (default: sentiment).")] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="A training key for every option, e.g. --set data.path=texts.csv --set batch_size=16.")] = None,
    budget: Annotated[str | None, typer.Option(
        help="Limits, e.g. memory=4GB,time=10m,adapter=5MB,params=1% (time: the whole run's training).")] = None,
    methods: Annotated[str, typer.Option("--methods", "-m", help="Comma-separated methods, or 'all'.")] = "all",
    variants: Annotated[str, typer.Option(
        help="'all': each method's defaults and each searched setting changed in turn; 'defaults': one row per method.")] = "all",
    steps: Annotated[int, typer.Option(help="Timed probe steps per option (after one warm-up step).")] = 3,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Directory for plan.json and plan.md (default: runs/plan-<task>).")] = None,
) -> None:
    """Predict, for every applicable method, trainable parameters, adapter bytes, peak memory and
    training time on this hardware from a short probe; mark what fits the budget; rank.

    Exits with code 1 when no option fits the budget (the cheapest option and its cost are printed).
    """
    with fail_cleanly({"budget": "--budget"}):
        from deltatune.train.budget import parse_budget
        from deltatune.train.plan import markdown_table, no_fit_message, run_plan

        limits = parse_budget(budget)  # a bad budget fails before any model loads
        overrides = [*([f"task={task}"] if task else []), *([f"model={model}"] if model else []), *(set_ or [])]
        output = output or Path("runs") / f"plan-{task_named(overrides)}"
        result = run_plan(overrides, methods, variants, limits, steps, output)
        typer.echo("")
        typer.echo(markdown_table(result))
        typer.echo(f"wrote {output / 'plan.json'} and {output / 'plan.md'}")
        message = no_fit_message(result)
        if message:
            typer.secho(message, err=True, fg=typer.colors.RED)
            raise typer.Exit(1)
