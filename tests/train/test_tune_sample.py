"""What a tune trial trains: a setting left at its usual choice keeps the task's own value."""

from __future__ import annotations

import pytest

optuna = pytest.importorskip("optuna")

from deltatune.train.tune import sample, trial_config  # noqa: E402


def _trial(**params: object) -> object:
    return optuna.trial.FixedTrial({"lr_scale": 1.0, **params})


SPACE = {"lora": {"rank": ["8", "4", "16"], "target": ["all-linear", "attention-qv"]}}


def test_usual_choices_are_not_settings_so_the_task_recipe_stands() -> None:
    """``task: text`` trains LoRA at rank 16 (alpha 32). A trial at the space's usual choices is that run,
    as ``deltatune train`` makes it (it ran rank 8 on every linear layer before); a changed choice
    changes that one setting on top of the task's recipe."""
    method, choices, scale, epochs = sample(_trial(method="lora", **{"lora.rank": "8", "lora.target": "all-linear"}),
                                            SPACE, (1,))
    assert (method, choices, scale, epochs) == ("lora", {}, 1.0, 1)
    usual = trial_config({"task": "text"}, method, choices, scale, epochs)
    assert (usual.adapter["rank"], usual.adapter["alpha"]) == (16, 32)
    _, choices, _, _ = sample(_trial(method="lora", **{"lora.rank": "4", "lora.target": "all-linear"}), SPACE, (1,))
    assert choices == {"rank": "4"}
    changed = trial_config({"task": "text"}, "lora", choices, 1.0, 1)
    assert (changed.adapter["rank"], changed.adapter["alpha"]) == (4, 32)
