"""``deltatune inspect MODEL [CONFIG] [--target ...]``: the module tree, what a config adapts, and the count."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from deltatune.cli.common import fail_cleanly


def inspect(
    model: Annotated[str, typer.Argument(
        help="A built-in model name (e.g. all-minilm-l6-v2), a local directory, or a training run (its config on its base).")],
    config: Annotated[Path | None, typer.Argument(help="A training config whose method and adapter to apply.")] = None,
    target: Annotated[list[str] | None, typer.Option(
        "--target", "-t", help="Modules to adapt (name, suffix, 're:' pattern or all-linear); repeatable.")] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Override config keys, e.g. --set method=lora --set adapter.rank=4.")] = None,
    depth: Annotated[int, typer.Option(help="Tree depth to print; deeper modules are summarised.")] = 8,
) -> None:
    """Print the module tree, marking the modules the config would adapt, and the trainable-parameter count."""
    with fail_cleanly():
        from deltatune.train import load_config, load_model, prepare
        from deltatune.train.inspect import render_tree

        from deltatune.cli.common import parse_sets
        from deltatune.train.models import find_trained, read_trained
        from deltatune.train.tasks import get_task

        extra = [*(set_ or [])]
        if target:
            extra.append("adapter.target=[" + ", ".join(repr(t) for t in target) + "]")
        try:
            kind, where = find_trained(model)
        except ValueError:
            kind = where = None
        if kind is not None and config is None:  # a run: what its recorded config adapts, on its base
            recorded = read_trained(model, parse_sets(extra) or None)
            cfg, labels = recorded.config, recorded.labels
            if kind == "full":  # a merged model: the model itself
                cfg = cfg.model_copy(update={"model": str(where)})
        else:
            cfg = load_config(config, [f"model={model}", *extra])
            labels = None
        task = get_task(cfg.task)
        loaded = load_model(cfg.model, task, labels or task.fixed_labels() or ["a", "b"], cfg)
        strategy = prepare(loaded, cfg)
        typer.echo(render_tree(loaded.model, depth))
        typer.echo("")
        typer.echo(strategy.report())
