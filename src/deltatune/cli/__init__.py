"""The ``deltatune`` command line: one typer app, one module per command.

Each command lives in ``deltatune/cli/<command>.py`` as a plain typed function that parses its
options and calls the library (``deltatune.train`` and the public API); it holds no logic of its
own. Registering a command is one explicit line below, so ``deltatune --help`` lists exactly what
is written here and importing this package has no side effects beyond building the app.

Command modules import torch/transformers inside the function body, so ``--help`` stays fast.
"""

from __future__ import annotations

import typer

from deltatune.cli import combine as combine_cmd
from deltatune.cli import compare as compare_cmd
from deltatune.cli import convert as convert_cmd
from deltatune.cli import eval as eval_cmd
from deltatune.cli import export as export_cmd
from deltatune.cli import inspect as inspect_cmd
from deltatune.cli import merge as merge_cmd
from deltatune.cli import plan as plan_cmd
from deltatune.cli import predict as predict_cmd
from deltatune.cli import serve as serve_cmd
from deltatune.cli import train as train_cmd
from deltatune.cli import tune as tune_cmd

app = typer.Typer(
    name="deltatune",
    help="Parameter-efficient fine-tuning (delta tuning) for any PyTorch model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# One line per command: app.command(name)(module.function).
app.command("train")(train_cmd.train)
app.command("eval")(eval_cmd.eval_)
app.command("predict")(predict_cmd.predict)
app.command("merge")(merge_cmd.merge)
app.command("inspect")(inspect_cmd.inspect)
app.command("convert")(convert_cmd.convert)
app.command("compare")(compare_cmd.compare)
app.command("combine")(combine_cmd.combine)
app.command("export")(export_cmd.export)
app.command("serve")(serve_cmd.serve)
app.command("plan")(plan_cmd.plan)
app.command("tune")(tune_cmd.tune)


def main() -> None:
    """Console-script entry point (``deltatune = deltatune.cli:main``)."""
    app()


__all__ = ["app", "main"]
