"""``deltatune predict`` with several adapters (a per-line choice) and ``deltatune combine``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deltatune.cli import app

runner = CliRunner()
TEXTS = ["good great day", "awful sad food", "the meeting", "love it"]


def invoke(*args: object) -> str:
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def runs(tiny_bert: Path, tiny_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    for name, seed in (("first", 1), ("second", 2)):
        out[name] = tmp_path_factory.mktemp(name) / "run"
        invoke("train", "--set", f"model={tiny_bert}", "--set", "task=classification", "--set", f"data.path={tiny_csv}",
               "--set", "epochs=1", "--set", "batch_size=8", "--set", "adapter.rank=2", "--set", f"seed={seed}",
               "--set", "precision=fp32", "--output", out[name], "--no-progress")
    return out


def _predict(tmp_path: Path, run: Path, lines: list[dict], *extra: object) -> list[dict]:
    inputs, preds = tmp_path / "in.jsonl", tmp_path / "preds.jsonl"
    inputs.write_text("".join(json.dumps(line) + "\n" for line in lines))
    invoke("predict", run, "--input", inputs, "--output", preds, *extra)
    return [json.loads(line) for line in preds.read_text().splitlines()]


def _close(a: dict, b: dict) -> bool:
    return a["label"] == b["label"] and all(abs(x - y) < 1e-5 for x, y in zip(a["logits"], b["logits"]))


def test_predict_picks_an_adapter_per_line(runs: dict[str, Path], tmp_path: Path) -> None:
    alone = {n: _predict(tmp_path, run, [{"text": t} for t in TEXTS]) for n, run in runs.items()}
    name = json.loads((runs["first"] / "adapter" / "adapter_config.json").read_text())["adapter_name"]
    lines = [{"text": TEXTS[0], "adapter": "second"}, {"text": TEXTS[1]}, {"text": TEXTS[2], "adapter": None},
             {"text": TEXTS[3], "adapter": "second"}]
    mixed = _predict(tmp_path, runs["first"], lines, "--adapter", f"second={runs['second']}")
    assert [p["adapter"] for p in mixed] == ["second", name, None, "second"]
    assert _close(mixed[0], alone["second"][0]) and _close(mixed[3], alone["second"][3])
    assert _close(mixed[1], alone["first"][1])
    assert not _close(mixed[2], alone["first"][2])  # the bare base (a fresh head) differs

    result = runner.invoke(app, ["predict", str(runs["first"]), "--input", str(tmp_path / "in.jsonl"),
                                 "--output", str(tmp_path / "p.jsonl"), "--adapter", "nameless"])
    assert result.exit_code == 2 and "NAME=DIR" in result.output


def test_combine_then_predict(runs: dict[str, Path], tmp_path: Path) -> None:
    alone = _predict(tmp_path, runs["first"], [{"text": t} for t in TEXTS])
    # cat with weights 1, 0 and the first run's head is exactly the first adapter
    invoke("combine", runs["first"], runs["second"], "--how", "cat", "--weights", "1,0", "--heads-from", "1",
           "--output", tmp_path / "combined")
    combined = _predict(tmp_path, tmp_path / "combined", [{"text": t} for t in TEXTS])
    assert all(_close(a, b) for a, b in zip(combined, alone))
    meta = json.loads((tmp_path / "combined" / "adapter_config.json").read_text())
    assert meta["training"]["how"] == "cat" and len(meta["training"]["combined_from"]) == 2

    out = invoke("combine", runs["first"], runs["second"], "--how", "ties", "--density", "0.5", "--weights", "0.6",
                 "--weights", "0.4", "--heads-from", "2", "--output", tmp_path / "ties")
    assert "into" in out and (tmp_path / "ties" / "adapter_model.safetensors").is_file()
    for bad, message in ((["--how", "ties"], "--heads-from"), (["--how", "cat", "--weights", "1"], "one weight per")):
        result = runner.invoke(app, ["combine", str(runs["first"]), str(runs["second"]), *bad,
                                     "--output", str(tmp_path / "bad")])
        assert result.exit_code == 2 and message in result.output, result.output


def test_combine_refuses_adapters_of_different_bases(runs: dict[str, Path], tiny_bert: Path, tiny_csv: Path,
                                                     tmp_path: Path) -> None:
    """Adapters trained on two base models are refused before any weights load (the same architecture
    would otherwise combine without a word); two storages of one base (nf4 and full precision) combine
    with a warning naming which one the result is for."""
    import shutil

    other = tmp_path / "other-bert"
    shutil.copytree(tiny_bert, other)
    for name, model, extra in (("moved", other, []), ("nf4", tiny_bert, ["--set", "quantize=nf4"])):
        if extra:
            pytest.importorskip("bitsandbytes")
        invoke("train", "--set", f"model={model}", "--set", "task=classification", "--set", f"data.path={tiny_csv}",
               "--set", "epochs=1", "--set", "batch_size=8", "--set", "adapter.rank=2", "--set", "precision=fp32",
               *extra, "--output", tmp_path / name, "--no-progress")
    bad = runner.invoke(app, ["combine", str(runs["first"]), str(tmp_path / "moved"), "--how", "linear",
                              "--heads-from", "1", "--output", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "different base models" in bad.output and not (tmp_path / "x").exists()
    mixed = runner.invoke(app, ["combine", str(tmp_path / "nf4"), str(runs["first"]), "--how", "linear",
                                "--heads-from", "1", "--output", str(tmp_path / "y")])
    assert mixed.exit_code == 0 and "differently stored bases" in mixed.output and "nf4" in mixed.output
    # predict with an extra adapter trained on the full-precision base, on the nf4 run's base: said
    (tmp_path / "in.jsonl").write_text('{"text": "good"}\n')
    out = runner.invoke(app, ["predict", str(tmp_path / "nf4"), "--adapter", f"b={runs['first']}", "--input",
                              str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "p.jsonl")])
    assert out.exit_code == 0 and "trained on a full-precision base and is loaded on an nf4 base" in out.output
