"""``deltatune train [CONFIG.yaml] [--set key=value ...] [--output DIR] [--resume | --overwrite]``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from deltatune.cli.common import fail_cleanly


def train(
    config: Annotated[Path | None, typer.Argument(help="YAML config (see the recipes); defaults if omitted.")] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Override a key, e.g. --set epochs=1 --set adapter.rank=16 (repeatable).")] = None,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Run directory (default: runs/<task>-<method>).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the run directory's last checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option(
        help="Replace the run already in the output directory (removes only what deltatune wrote there).")] = False,
    progress: Annotated[bool, typer.Option(help="Show the progress bar.")] = True,
) -> None:
    """Fine-tune a model; write the adapter, metrics, config and a plot.

    No arguments: LoRA on all-MiniLM-L6-v2 for tweet sentiment (5-9 min on 2 cores).
    Keys: model, task (sentiment | classification | chat | instruct | text | image |
    recommend), method (full or a deltatune method), adapter.*, optimizer, epochs,
    batch_size, max_length, lr, seed, ... Commented examples: the recipes/ folder of
    the package.
    """
    with fail_cleanly():
        from deltatune.train import load_config, run_training
        from deltatune.train.config import lr_note
        from deltatune.train.run import read_run_config

        overrides = list(set_ or [])
        cfg = load_config(config, overrides, output=output)
        # The run being resumed: its config.yaml, read and validated once here.
        recorded = read_run_config(cfg.resolved_output()) if resume else None
        note = lr_note(cfg)
        if recorded is not None and config is None and not set_:  # `--resume` alone continues the run as it was
            cfg, note = recorded.model_copy(update={"output": cfg.output}), None
        elif recorded is not None and note and recorded.lr != cfg.lr:
            # a run started before lr followed the method keeps the lr it was started with
            cfg = load_config(config, [*overrides, f"lr={recorded.lr!r}"], output=output)
            note = f"lr {recorded.lr:g} (as recorded in {cfg.resolved_output() / 'config.yaml'}, the run being resumed)"
        if note:
            typer.echo(note)
        try:
            run_training(cfg, resume=resume, progress=progress, overwrite=overwrite, recorded=recorded)
        except KeyboardInterrupt:
            typer.secho(f"\ninterrupted; continue with: deltatune train --output {cfg.resolved_output()} --resume",
                        err=True, fg=typer.colors.YELLOW)
            raise typer.Exit(130) from None
