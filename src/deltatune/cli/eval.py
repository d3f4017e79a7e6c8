"""``deltatune eval ADAPTER_DIR [--split test]``: metrics of a trained adapter on a split."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from deltatune.cli.common import check_output_file, fail_cleanly, parse_sets


def eval_(
    adapter_dir: Annotated[Path, typer.Argument(help="A run directory, its adapter/ folder, or a merged model.")],
    split: Annotated[str, typer.Option(help="train, validation or test (rebuilt with the run's seed).")] = "test",
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Change the recorded config, e.g. --set data.path=other.csv or --set eval_batch_size=64.")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Also write the metrics to this JSON file.")] = None,
) -> None:
    """Score a trained adapter on a data split and print the metrics as JSON."""
    with fail_cleanly():
        if split not in ("train", "validation", "test"):
            raise ValueError(f"--split must be train, validation or test, not {split!r}")
        from deltatune.core.files import write_text_atomic
        from deltatune.train import load_trained
        from deltatune.train.loop import make_runner, pick_device

        if output is not None:
            check_output_file(output, "metrics.json")
        overrides = parse_sets(set_)
        # The model first: its checks (a head with another number of labels than the data's) say more
        # than the data's (too few examples to split) when both are wrong.
        trained = load_trained(adapter_dir, overrides)
        config, task = trained.config, trained.task
        device = pick_device(config.device)
        trained.model.to(device)
        examples = getattr(task.load_splits(config, trained.labels), split)  # labels by name
        items = task.encode(trained.tokenizer, examples, config.max_length)
        metrics = task.evaluate(trained.model, items, trained.tokenizer, config.eval_batch_size,
                                make_runner(device, config.precision))
        result = {"split": split, "examples": len(items), **metrics}
        text = json.dumps(result, indent=2)
        print(text)
        if output is not None:
            output.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(output, text + "\n")
