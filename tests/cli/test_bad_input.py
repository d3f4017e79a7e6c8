"""A user's mistakes, as the command line meets them: one ``error:`` line naming the fix, exit status 2,
raised before any work (no training, no model load where the check needs none), and nothing written.

Each test here failed before its fix: the mistake trained to the end and then died, printed a Python
traceback, or wrote (or overwrote) something.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deltatune.cli import app
from tests.cli_fails import fails

runner = CliRunner()


def works(*args: object) -> str:
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def tiny(tiny_bert: Path, tiny_csv: Path) -> list[str]:
    return ["--set", f"model={tiny_bert}", "--set", "task=classification", "--set", f"data.path={tiny_csv}",
            "--set", "epochs=1", "--set", "batch_size=8", "--set", "precision=fp32",
            "--no-progress"]


@pytest.fixture(scope="module")
def run(tiny_bert: Path, tiny_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bad-input") / "run"
    works("train", *tiny(tiny_bert, tiny_csv), "--output", out)
    return out


# --- train: settings that used to fail only after training ------------------------------------------


@pytest.mark.parametrize(("settings", "expected"), [
    (["method=bottleneck"], "save_format: peft: method 'bottleneck' has no PEFT equivalent"),
    (["method=oft"], "save_format: peft: method 'oft' has no PEFT equivalent"),
    (["method=full"], "method full saves the whole model (model/), which PEFT's format does not hold"),
])
def test_save_format_peft_that_cannot_be_written_fails_before_training(settings: list[str], expected: str,
                                                                       tiny_bert: Path, tiny_csv: Path,
                                                                       tmp_path: Path) -> None:
    # before: bottleneck / oft trained to the end and failed while saving; full ignored save_format
    args = [a for s in settings for a in ("--set", s)]
    line = fails("train", *tiny(tiny_bert, tiny_csv), "--set", "save_format=peft", *args, "--output", tmp_path / "r")
    assert expected in line
    assert not (tmp_path / "r").exists()


def test_mistyped_early_stopping_metric_fails_before_training(tiny_bert: Path, tiny_csv: Path,
                                                              tmp_path: Path) -> None:
    # before: the run trained its first epoch, then stopped at the first validation
    line = fails("train", *tiny(tiny_bert, tiny_csv), "--set", "early_stopping_patience=2",
                 "--set", "early_stopping_metric=acuracy", "--output", tmp_path / "r")
    assert "early_stopping_metric 'acuracy' is not a validation metric of task 'classification'" in line
    assert "loss, accuracy, macro_f1" in line
    assert not (tmp_path / "r").exists()


def test_declared_validation_metrics_are_what_validation_reports(run: Path) -> None:
    from deltatune.train.tasks import TASKS

    metrics = json.loads((run / "metrics.json").read_text())
    reported = {k.removeprefix("test_") for k in metrics if k.startswith("test_")}
    assert set(TASKS["classification"].validation_metrics) == reported


def test_max_length_beyond_the_models_positions_fails_before_training(tiny_bert: Path, tmp_path: Path) -> None:
    # before: a RuntimeError traceback (expanded size 200 vs 64) at the first training step
    from tests.train.tiny import make_texts

    data = tmp_path / "long.csv"
    data.write_text("text,label\n" + "".join(f"{' '.join([t] * 30)},{label}\n" for t, label in make_texts(60)))
    line = fails("train", *tiny(tiny_bert, data), "--set", "max_length=200", "--output", tmp_path / "r")
    assert "max_length 200 is more than the 64 positions model" in line and "set max_length=64 or less" in line
    assert not (tmp_path / "r").exists()


def test_eval_with_a_max_length_beyond_the_positions_fails_cleanly(run: Path) -> None:
    assert "set max_length=64 or less" in fails("eval", run, "--set", "max_length=65")


def test_a_run_stopped_by_bad_data_leaves_no_directory(tiny_bert: Path, tmp_path: Path) -> None:
    # before: runs/<name>/ stayed behind holding only .deltatune.lock
    line = fails("train", *tiny(tiny_bert, tmp_path / "missing.csv"), "--output", tmp_path / "r")
    assert "missing.csv not found" in line
    assert not (tmp_path / "r").exists()
    own = tmp_path / "mine"  # a directory that was there before stays, empty as it was
    own.mkdir()
    fails("train", *tiny(tiny_bert, tmp_path / "missing.csv"), "--output", own)
    assert own.is_dir() and not any(own.iterdir())
    # the parents it made for the run (runs/ for the default output) go too; one that was there stays
    fails("train", *tiny(tiny_bert, tmp_path / "missing.csv"), "--output", own / "a" / "b" / "r")
    assert own.is_dir() and not any(own.iterdir())


# --- eval / predict outputs ---------------------------------------------------------------------------


def test_eval_and_predict_refuse_an_output_directory_before_loading(run: Path, tmp_path: Path) -> None:
    # before: IsADirectoryError tracebacks after the model had loaded and scored everything
    inputs = tmp_path / "in.jsonl"
    inputs.write_text('{"text": "good day"}\n')
    (tmp_path / "outdir").mkdir()
    line = fails("eval", run, "--output", tmp_path / "outdir")
    assert "is a directory; give a file path, e.g." in line and "metrics.json" in line
    line = fails("predict", run, "--input", inputs, "--output", tmp_path / "outdir")
    assert "is a directory; give a file path, e.g." in line and "preds.jsonl" in line


def test_predict_refuses_to_write_over_its_input(run: Path, tmp_path: Path) -> None:
    # before: the input (ids, labels and all) was replaced by predictions holding only text, label, logits
    inputs = tmp_path / "in.jsonl"
    original = '{"text": "good day", "id": 7, "label": "positive"}\n'
    inputs.write_text(original)
    line = fails("predict", run, "--input", inputs, "--output", tmp_path / "." / "in.jsonl")
    assert "is the input file" in line and "write the results to another file" in line
    assert inputs.read_text() == original


# --- data files as spreadsheet programs save them -----------------------------------------------------


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-16-be", "utf-32"])
def test_files_with_a_byte_order_mark_read_as_written(encoding: str, tmp_path: Path) -> None:
    # before: Excel's "CSV UTF-8" had a first column named '\ufefftext' ("no column 'text'"), and a
    # UTF-16 file was one garbled line of NUL bytes in the error message
    from deltatune.train import data as D

    rows = [("café ☕", "positive"), ("naïve, but fine", "neutral")]
    for suffix, text in ((".csv", "text,label\n" + "".join(f'"{t}",{label}\n' for t, label in rows)),
                         (".jsonl", "".join(json.dumps({"text": t, "label": label}) + "\n" for t, label in rows))):
        path = tmp_path / f"data{suffix}"
        with path.open("w", encoding=encoding, newline="") as fh:
            if encoding == "utf-16-be":
                fh.write("\ufeff")  # utf-16-be writes no mark of its own
            fh.write(text)
        assert D.read_table(path, ["text", "label"]) == rows, (encoding, suffix)


def test_a_file_marked_utf16_that_is_not_names_the_fix(tmp_path: Path) -> None:
    from deltatune.train import data as D

    path = tmp_path / "data.csv"
    path.write_bytes(b"\xff\xfe" + "text,label\n".encode("utf-16-le") + b"\x00\xd8")  # a lone surrogate half
    with pytest.raises(ValueError, match="data.csv starts as UTF-16 but byte .* is not; save it as UTF-8"):
        D.read_table(path, ["text", "label"])


def test_set_with_a_space_instead_of_equals_names_the_set(tmp_path: Path) -> None:
    # before: "config file 1 not found" (typer took the value for the CONFIG argument)
    line = fails("train", "--set", "epochs", "1", "--output", tmp_path / "r")
    assert "--set expects key=value (e.g. --set epochs=1), got 'epochs'" in line
    assert not (tmp_path / "r").exists()


def test_predict_checks_adapter_options_and_line_choices_before_predicting(run: Path, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    inputs = tmp_path / "in.jsonl"
    inputs.write_text('{"text": "good day"}\n{"text": "bad day", "adapter": "nosuch"}\n')
    # before: "no adapter named 'nosuch' is attached (attached: 'default')", naming neither the line nor the fix
    line = fails("predict", run, "--input", inputs, "--output", tmp_path / "p.jsonl")
    assert f"{inputs}, line 2: adapter 'nosuch' is not loaded (loaded: 'default'); add --adapter nosuch=DIR" in line
    assert not (tmp_path / "p.jsonl").exists()

    import deltatune.train

    def no_model(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model loaded before --adapter was checked")

    monkeypatch.setattr(deltatune.train, "load_trained", no_model)  # before: checked after the model loaded
    assert "--adapter takes NAME=DIR" in fails("predict", run, "--input", inputs, "--output", tmp_path / "p.jsonl",
                                               "--adapter", str(run))
    assert "holds no adapter" in fails("predict", run, "--input", inputs, "--output", tmp_path / "p.jsonl",
                                       "--adapter", f"b={tmp_path / 'nowhere'}")


def test_convert_takes_a_run_directory_like_the_other_commands(run: Path, tmp_path: Path) -> None:
    # before: "run/adapter_config.json not found", though eval, predict, merge and combine take the run
    assert "(peft format) from" in works("convert", run, tmp_path / "peft", "--to", "peft")
    assert (tmp_path / "peft" / "adapter_config.json").is_file()
    assert "not found; expected an adapter directory" in fails("convert", tmp_path / "nowhere", tmp_path / "x",
                                                               "--to", "peft")


def test_a_semicolon_separated_csv_names_its_separator(tmp_path: Path) -> None:
    # before: "has no column 'text' (columns: text;label)", which reads as if 'text' were there
    from deltatune.train import data as D

    path = tmp_path / "data.csv"
    path.write_text("text;label\ngood day;positive\n")
    with pytest.raises(ValueError, match=r"reads as one column 'text;label': its fields are separated by ';'"):
        D.read_table(path, ["text", "label"])
    path.write_text("sentence,label\ngood day,positive\n")  # a real missing column still says so
    with pytest.raises(ValueError, match=r"has no column 'text' \(columns: sentence, label\)"):
        D.read_table(path, ["text", "label"])


def test_an_image_folder_without_class_folders_shows_the_real_path(tmp_path: Path) -> None:
    # before: the example read "(e.g. {root}/cat/1.png)", the placeholder printed as it was
    from deltatune.train.image_files import folder_rows

    (tmp_path / "pics").mkdir()
    with pytest.raises(ValueError, match="has no class folders") as err:
        folder_rows(tmp_path / "pics")
    assert f"(e.g. {tmp_path / 'pics' / 'cat' / '1.png'})" in str(err.value) and "{root}" not in str(err.value)


def test_a_csv_header_with_a_column_twice_is_refused(tmp_path: Path) -> None:
    # before: the second 'text' column silently won, the first was never read
    from deltatune.train import data as D

    path = tmp_path / "data.csv"
    path.write_text("text,label,text\ngood day,positive,(empty)\n")
    with pytest.raises(ValueError, match=r"data.csv, line 1: the header names column 'text' twice; rename one"):
        D.read_table(path, ["text", "label"])
    path.write_text("text,label,,\ngood day,positive,,\n")  # unnamed trailing columns are left alone
    assert D.read_table(path, ["text", "label"]) == [("good day", "positive")]
