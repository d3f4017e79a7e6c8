"""``deltatune tune [MODEL] [--task ...] [--set ...] [--budget ...] --trials N [--storage URL]``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from deltatune.cli.common import fail_cleanly, task_named


def tune(
    model: Annotated[str | None, typer.Argument(help="Base model: a built-in name or a directory (default: the task's).")] = None,
    task: Annotated[str | None, typer.Option(help="Task (default: sentiment).")] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="A training key for every trial, e.g. --set data.max_train_examples=2000.")] = None,
    budget: Annotated[str | None, typer.Option(
        help="Limits every trial must fit, e.g. memory=4GB,time=10m,adapter=5MB,params=1%.")] = None,
    methods: Annotated[str, typer.Option("--methods", "-m", help="Comma-separated methods to search, or 'all'.")] = "all",
    trials: Annotated[int, typer.Option(help="Run until this many trials have finished in the study (with asha, "
                                         "the survey takes each method once and a third of them again).")] = 20,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Directory for the study, trial runs and reports (default: runs/tune-<task>).")] = None,
    storage: Annotated[str | None, typer.Option(
        help="Optuna storage URL (default: sqlite:///OUTPUT/study.db); share it to search from several processes.")] = None,
    study_name: Annotated[str | None, typer.Option(help="Study name (default: from the settings).")] = None,
    pruner: Annotated[str, typer.Option(help="Early stopping: asha, hyperband or none.")] = "asha",
    rungs: Annotated[int, typer.Option(
        help="Rungs per trial: validations at ..., 1/9, 1/3 and all of the run, where the pruner decides "
             "(early ones on 256 validation items; with asha, a new study first surveys every method to the "
             "first rung on 128 and continues the best third).")] = 3,
    epochs: Annotated[str | None, typer.Option(help="Epoch counts to search, e.g. 1,2 (default: the config's).")] = None,
    seed: Annotated[int, typer.Option(help="The sampler's seed (and the order of the first trials' survey of methods).")] = 0,
    probe_steps: Annotated[int, typer.Option(help="Timed probe steps per option in the cost prediction.")] = 3,
    heartbeat: Annotated[int, typer.Option(
        help="Seconds between a trial's heartbeats; a trial silent for twice this (its process died) is retried.")] = 30,
) -> None:
    """Search methods and their settings (learning rate, rank, targets, layers, epochs) under a budget,
    with early stopping; report the Pareto front and write the best configuration as best.yaml."""
    with fail_cleanly({"budget": "--budget"}):
        from deltatune.train.budget import parse_budget
        from deltatune.train.tune import run_tune

        limits = parse_budget(budget)
        try:
            epoch_list = [int(e) for e in epochs.split(",")] if epochs else None
        except ValueError:
            raise ValueError(f"--epochs {epochs!r}: give whole numbers, e.g. --epochs 1,2") from None
        overrides = [*([f"task={task}"] if task else []), *([f"model={model}"] if model else []), *(set_ or [])]
        output = output or Path("runs") / f"tune-{task_named(overrides)}"
        result = run_tune(overrides, methods, limits, trials, output, storage, study_name, pruner, rungs,
                          epoch_list, seed, probe_steps, heartbeat)
        from deltatune.train.tune_report import table

        typer.echo("")
        typer.echo(table([r for r in result["trials"] if r["number"] in result["pareto"]], result["metric"]))
        best = result["best"]
        if best is None:
            typer.secho("error: no trial finished; see tune.md", err=True, fg=typer.colors.RED)
            raise typer.Exit(1)
        typer.echo(f"best: trial {best['number']}, {best['label']}, validation {result['metric']} {best['value']:.4f}; "
                   f"wrote {output / 'tune.md'}, {output / 'pareto.png'} and {output / 'best.yaml'}")
