"""plan, tune and compare write their files into --output: a directory holding the user's own files
is refused before any work (a same-named file of theirs would be replaced); their own earlier output,
and the runs compare trained there, are not in the way."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deltatune.train.output import LOCK_FILE, check_output_for


def test_a_directory_with_a_users_file_is_refused_naming_it(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"holds 'notes.txt', which deltatune plan did not write"):
        check_output_for(tmp_path, "plan", ("plan.json", "plan.md"))
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        check_output_for(tmp_path / "f", "plan", ("plan.json",))


def test_its_own_files_leftovers_and_runs_are_not_in_the_way(tmp_path: Path) -> None:
    check_output_for(tmp_path / "new", "plan", ("plan.json",))  # absent: fine
    (tmp_path / "plan.json").write_text("{}")
    (tmp_path / ".plan.json.tmp-123-ab").write_text("")
    check_output_for(tmp_path, "plan", ("plan.json", "plan.md"))
    run = tmp_path / "lora"
    run.mkdir()
    (run / LOCK_FILE).write_text(json.dumps({"pid": 1}))
    check_output_for(tmp_path, "compare", ("plan.json", "compare.json"), runs_inside=True)
    with pytest.raises(ValueError, match="'lora', which deltatune plan did not write"):
        check_output_for(tmp_path, "plan", ("plan.json",))


@pytest.mark.parametrize("command", ["plan", "tune", "compare"])
def test_the_commands_refuse_before_any_work(command: str, tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text("text,label\n")
    if command == "plan":
        from deltatune.train.plan import run_plan as call
    elif command == "tune":
        pytest.importorskip("optuna")
        from deltatune.train.tune import run_tune as call
    else:
        from deltatune.train.compare import run_comparison as call
    kwargs = {"output": tmp_path} if command != "compare" else {}
    with pytest.raises(ValueError, match=f"'data.csv', which deltatune {command} did not write"):
        if command == "compare":
            call("lora", tmp_path)
        else:
            call(["task=classification", "data.path=missing.csv"], "lora", **kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.csv"]
