"""Library mistakes a user makes (``dt.*``): each is one exception at the call that names the fix.

Each test here failed before its fix: a ``re.error`` traceback from deep in attach, an
``AttributeError`` about ``parts``, an error naming the wrong setting or the wrong number.
"""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune.methods import METHODS


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


@pytest.mark.parametrize(("kwargs", "where"), [
    ({"target": "re:["}, "target 're:['"),
    ({"target": ["0", "re:(a"]}, "target 're:(a'"),
    ({"exclude": ["re:*x"]}, "exclude 're:*x'"),
    ({"modules_to_save": ["re:)"]}, "modules_to_save 're:)'"),
    ({"rank_pattern": {"re:[": 4}}, "rank_pattern 're:['"),
])
def test_a_broken_regular_expression_fails_when_the_config_is_made(kwargs: dict, where: str) -> None:
    with pytest.raises(ValueError, match=rf"{__import__('re').escape(where)} is not a valid regular expression"):
        dt.LoraConfig(**kwargs)
    assert dt.LoraConfig(target="re:[0-2]").target == "re:[0-2]"  # a good one still works


def test_a_broken_regular_expression_under_the_cli_is_one_line_before_any_work(tmp_path) -> None:
    from typer.testing import CliRunner

    from deltatune.cli import app

    result = CliRunner().invoke(app, ["train", "--set", "adapter.target=re:[", "--set", "task=classification",
                                      "--set", f"data.path={tmp_path / 'missing.csv'}", "--output", str(tmp_path / "r")])
    assert result.exit_code == 2 and "is not a valid regular expression" in result.stderr
    assert not (tmp_path / "r").exists()


def test_attach_names_the_fix_for_a_class_or_a_dict() -> None:
    with pytest.raises(TypeError, match=r"not the class LoraConfig: call it, e.g. LoraConfig\(\)"):
        dt.attach(mlp(), dt.LoraConfig)
    with pytest.raises(TypeError, match=r"not a dict: build one with deltatune.config_from_dict"):
        dt.attach(mlp(), {"method": "lora", "target": ["0"]})
    with pytest.raises(TypeError, match="not str"):
        dt.attach(mlp(), "lora")


@pytest.mark.parametrize("method", ["lora", "dora", "loha", "lokr"])
def test_a_zero_rank_in_rank_pattern_is_reported_as_itself(method: str) -> None:
    # before: "rank must be >= 1, got 8" (the default rank, which is fine)
    with pytest.raises(ValueError, match=r"rank must be >= 1, got rank_pattern\['0'\] = 0"):
        METHODS[method](rank=8, rank_pattern={"0": 0})


def test_modules_to_save_that_matches_nothing_is_named_as_such() -> None:
    # before: "target ['zz'] matched 0 of 3 modules", naming the wrong setting
    with pytest.raises(dt.NoMatchError, match=r"^modules_to_save \['zz'\] matched 0 of 3 modules"):
        dt.attach(mlp(), dt.LoraConfig(target=["0"], modules_to_save=["zz"]))
