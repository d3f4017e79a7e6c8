"""``deltatune predict ADAPTER_DIR [--adapter NAME=DIR ...] --input FILE --output preds.jsonl``: one line per input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from deltatune.cli.common import check_output_file, fail_cleanly, parse_sets


def predict(
    adapter_dir: Annotated[Path, typer.Argument(help="A run directory, its adapter/ folder, or a merged model.")],
    input: Annotated[Path, typer.Option("--input", "-i", help="JSONL/CSV with a text column, or .txt with one text per line; for an image run also a picture or a folder of pictures.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write one JSON line per input.")],
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Change the recorded config, e.g. --set data.text_column=tweet.")] = None,
    adapter: Annotated[list[str] | None, typer.Option(
        "--adapter", help="Another adapter of the same base and task, NAME=DIR (repeatable). An input line "
        "picks one with its 'adapter' field: a NAME, the first adapter's name (the default), or null for the "
        "bare base.")] = None,
) -> None:
    """Predict a label (with its logits) for every input text."""
    with fail_cleanly():
        from deltatune.core.files import write_text_atomic
        from deltatune.train import load_trained
        from deltatune.train.data import check_text_field, read_numbered_records
        from deltatune.train.loop import make_runner, pick_device
        from deltatune.train.models import read_trained

        check_output_file(output, "preds.jsonl", [input])
        overrides = parse_sets(set_)
        recorded = read_trained(adapter_dir, overrides)
        own = recorded.task.read_inputs(input)  # e.g. pictures: one file or a folder
        numbered = list(enumerate(own, 1)) if own is not None else read_numbered_records(input)
        if not numbered:  # read and check first: a bad file fails before the model loads
            raise ValueError(f"{input} holds no inputs")
        records = [record for _, record in numbered]
        if own is None:
            check_text_field(input, numbered, recorded.task.input_field(records, recorded.config))
        named = _named_dirs(adapter or [])  # checked before the model loads, like the input
        trained = load_trained(adapter_dir, overrides)
        device = pick_device(trained.config.device)
        trained.model.to(device)
        run = make_runner(device, trained.config.precision)

        def predict_rows(indices: list[int]) -> list[dict]:
            return trained.task.predict(trained.model, trained.tokenizer, [records[i] for i in indices],
                                        trained.config, trained.labels, run)

        if adapter or any("adapter" in r for r in records):  # several adapters: each line picks one
            from deltatune.core.routing import run_grouped
            from deltatune.formats import load_adapters
            from deltatune.train.models import storage_mismatch

            for path in named.values():
                warning = storage_mismatch(path, trained.config.quantize)
                if warning:
                    typer.echo(f"warning: {warning}", err=True)
            choices = [r.get("adapter", trained.adapter) for r in records]
            _check_choices(input, numbered, choices, [trained.adapter, *named])
            load_adapters(trained.model, named)
            rows = [row | {"adapter": c} for row, c in zip(run_grouped(trained.model, choices, predict_rows), choices)]
        else:
            rows = predict_rows(list(range(len(records))))
        output.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(output, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        typer.echo(f"wrote {len(rows)} predictions to {output}")


def _check_choices(input: Path, numbered: list, choices: list, names: list[str | None]) -> None:
    """Every line's ``adapter`` must be one of ``names`` (the first is the run's own) or null."""
    for (line, _), choice in zip(numbered, choices):
        if choice is not None and choice not in names:
            known = ", ".join(repr(n) for n in names if n is not None)
            raise ValueError(f"{input}, line {line}: adapter {choice!r} is not loaded (loaded: {known}); "
                             f"add --adapter {choice}=DIR, or fix the line")


def _named_dirs(values: list[str]) -> dict[str, Path]:
    """``NAME=DIR`` options -> {name: adapter folder} (a run directory's adapter/ is found too)."""
    from deltatune.train.models import find_trained

    named: dict[str, Path] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--adapter takes NAME=DIR, e.g. --adapter news=runs/news; got {value!r}")
        kind, where = find_trained(path)
        if kind != "adapter":
            raise ValueError(f"--adapter {value}: {path} holds a full model, not an adapter")
        named[name] = where
    return named
