"""How ``deltatune train`` turns its arguments into a config, without training (run_training is stubbed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import deltatune.train
import deltatune.train.config as train_config
from deltatune.cli import app
from deltatune.train.config import to_yaml

runner = CliRunner()


@pytest.fixture
def seen(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(deltatune.train, "run_training", lambda config, **kw: calls.append({"config": config, **kw}))
    return calls


@pytest.mark.parametrize("name", ["a #1", "b: c", "[x]", "'quoted'", "yes", "1e3"])
def test_output_is_taken_as_given_not_read_as_yaml(name: str, tmp_path: Path, seen: list[dict[str, Any]]) -> None:
    out = tmp_path / name
    result = runner.invoke(app, ["train", "--output", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert seen[0]["config"].output == str(out) and seen[0]["config"].resolved_output() == out


def test_resume_validates_the_recorded_config_once(tmp_path: Path, seen: list[dict[str, Any]],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run #2"
    out.mkdir()
    recorded = train_config.load_config(None, ["epochs=3"], output=out)
    (out / "config.yaml").write_text(to_yaml(recorded))
    real, sources = train_config.validate_config, []

    def counting(data: dict[str, Any], source: str = "config") -> Any:
        sources.append(source)
        return real(data, source)

    monkeypatch.setattr(train_config, "validate_config", counting)
    monkeypatch.setattr("deltatune.train.run.validate_config", counting)
    result = runner.invoke(app, ["train", "--output", str(out), "--resume", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert sources.count(str(out / "config.yaml")) == 1
    assert seen[0]["config"].epochs == 3 and seen[0]["resume"] is True
    assert seen[0]["recorded"].model_dump() == seen[0]["config"].model_dump()
