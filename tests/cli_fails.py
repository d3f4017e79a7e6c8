"""``fails``: run the command line in-process and require a clean refusal (shared by the bad-input tests)."""

from __future__ import annotations

from typer.testing import CliRunner

from deltatune.cli import app

runner = CliRunner()


def fails(*args: object) -> str:
    """Run the CLI; assert exit status 2 with one ``error:`` line on stderr and no traceback. Returns the line."""
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: "), result.output  # one line on stderr
    assert "Traceback" not in result.output
    return errors[0]
