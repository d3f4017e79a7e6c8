"""``deltatune compare`` on a tiny random BERT: same split and budget per method, the three reports,
error rows, fresh processes, and argument checks before any work."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import deltatune as dt
from deltatune.cli import app
from deltatune.train import compare as C
from deltatune.train.compare import SHARED_KEYS, parse_methods, plan_comparison, run_comparison
from deltatune.train.compare_report import markdown_report


def shared(model: Path, data: Path, *extra: str) -> list[str]:
    return [f"model={model}", "task=classification", f"data.path={data}", "epochs=1", "batch_size=8",
            "eval_batch_size=7", *extra]


def md_rows(text: str) -> dict[str, list[str]]:
    """Markdown table rows by method: ``{"lora": ["lora", "reparameterization", "0.5", ...]}``."""
    rows = [line.strip("|").split("|") for line in text.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [c.strip() for c in cells] for cells in rows[1:]}  # rows[0] is the header


def test_full_lora_bitfit_same_budget_three_reports(tiny_bert: Path, tiny_csv: Path, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    result = run_comparison("lora,bitfit,full", out, shared(tiny_bert, tiny_csv), isolate=False)

    # Rows in family order (full, then specification, then reparameterization), all trained.
    saved = json.loads((out / "compare.json").read_text())
    assert [r["method"] for r in saved["rows"]] == ["full", "bitfit", "lora"]
    assert [r["family"] for r in saved["rows"]] == ["full", "specification", "reparameterization"]
    assert all(r["status"] == "ok" and r["error"] is None for r in saved["rows"])
    assert saved["splits"] == {"train": 48, "validation": 6, "test": 6, "labels": ["negative", "neutral", "positive"]}
    rows = {r["method"]: r for r in saved["rows"]}

    # Same task, split, seed and budget for every run; only the method's own settings differ.
    configs = {m: yaml.safe_load((out / m / "config.yaml").read_text()) for m in rows}
    for key in SHARED_KEYS:
        assert configs["full"][key] == configs["lora"][key] == configs["bitfit"][key], key
    assert configs["full"]["lr"] == 5e-5 and configs["lora"]["lr"] == 1e-3 and configs["bitfit"]["lr"] == 1e-2
    assert {r["metrics"]["steps"] for r in rows.values()} == {6}  # 48 examples / 8 per step, one epoch
    baselines = {r["metrics"]["majority_baseline_accuracy"] for r in rows.values()}
    assert len(baselines) == 1 and saved["majority_baseline"]["accuracy"] == baselines.pop()

    # Every row carries what its own run wrote, and the costs order as the methods say.
    for method, row in rows.items():
        run_metrics = json.loads((out / method / "metrics.json").read_text())
        assert row["accuracy"] == run_metrics["test_accuracy"] and row["macro_f1"] == run_metrics["test_macro_f1"]
        assert row["adapter_bytes"] == run_metrics["adapter_bytes"] > 0
        assert row["train_seconds"] > 0 and row["peak_memory_mb"] > 0
        assert not (out / method / "checkpoint").exists()  # compare has no --resume; the checkpoint goes
    full, bitfit, lora = rows["full"], rows["bitfit"], rows["lora"]
    assert full["trainable_parameters"] == full["total_parameters"] and full["trainable_share"] == 1.0
    assert bitfit["trainable_parameters"] < lora["trainable_parameters"] < full["trainable_parameters"]
    assert bitfit["adapter_bytes"] < lora["adapter_bytes"] < full["adapter_bytes"]
    assert saved["isolated"] is False and result["rows"] == json.loads(json.dumps(result["rows"]))

    # The Markdown table has one row per method with its numbers; the chart is a PNG.
    table = md_rows((out / "compare.md").read_text())
    assert list(table) == ["full", "bitfit", "lora"]
    assert table["lora"][1] == "reparameterization" and table["lora"][2] == f"{lora['accuracy']:.4f}"
    assert table["bitfit"][4] == f"{bitfit['trainable_parameters']:,}" and table["full"][5] == "100.000%"
    assert "note" not in (out / "compare.md").read_text().split("\n| full")[0]  # no error column without errors
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    # The reports redraw from the saved JSON alone, and say how to rerun the comparison.
    assert markdown_report(saved) == (out / "compare.md").read_text()
    assert f"`deltatune compare --methods lora,bitfit,full --set model={tiny_bert} " in markdown_report(saved)
    assert markdown_report(saved).count("--set ") == len(shared(tiny_bert, tiny_csv))


def test_a_failing_method_is_an_error_row(tiny_bert: Path, tiny_csv: Path, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    run_comparison("ia3,bitfit", out, shared(tiny_bert, tiny_csv), ["ia3.adapter.target=[no_such_module]"],
                   isolate=False)
    rows = {r["method"]: r for r in json.loads((out / "compare.json").read_text())["rows"]}
    assert rows["bitfit"]["status"] == "ok" and rows["bitfit"]["accuracy"] is not None
    assert rows["ia3"]["status"] == "error" and rows["ia3"]["accuracy"] is None
    assert rows["ia3"]["error"].startswith("NoMatchError: ") and "no_such_module" in rows["ia3"]["error"]
    assert "Traceback" in (out / "ia3" / "log.txt").read_text()
    table = md_rows((out / "compare.md").read_text())
    assert table["ia3"][2] == "—" and table["ia3"][-1].startswith("error: NoMatchError")
    assert table["bitfit"][-1] == ""
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"


def test_fresh_process_gives_the_in_process_result(tiny_bert: Path, tiny_csv: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    here = run_comparison("bitfit", tmp_path / "here", shared(tiny_bert, tiny_csv), isolate=False)["rows"][0]
    apart = run_comparison("bitfit", tmp_path / "apart", shared(tiny_bert, tiny_csv), isolate=True)["rows"][0]
    assert apart["status"] == "ok" and apart["accuracy"] == here["accuracy"]
    assert apart["metrics"]["test_loss"] == pytest.approx(here["metrics"]["test_loss"], rel=1e-5)
    assert "bitfit on classification" not in (tmp_path / "apart" / "bitfit" / "log.txt").read_text()  # no bar
    # A process that dies without a result is an error row with its exit code and last log line.
    monkeypatch.setattr(C.sys, "executable", "false")
    dead = run_comparison("bitfit", tmp_path / "dead", shared(tiny_bert, tiny_csv), isolate=True)["rows"][0]
    assert dead["status"] == "error" and "exited with code 1" in dead["error"]
    monkeypatch.setattr(C.sys, "executable", sys.executable)


def test_method_names_are_checked() -> None:
    with pytest.raises(ValueError, match=r"unknown method 'lroa'.*available: all, full, lora.*did you mean 'lora'"):
        parse_methods("full,lroa")
    with pytest.raises(ValueError, match="twice"):
        parse_methods("lora, lora")
    with pytest.raises(ValueError, match="empty"):
        parse_methods(" , ")
    assert parse_methods(["full, lora", "bitfit"]) == (["full", "lora", "bitfit"], False)
    assert parse_methods("all") == (["full", *dt.METHODS], True)
    assert C.family_of("no-such-method") == "other"


def test_settings_are_checked_before_any_work(tiny_csv: Path, tmp_path: Path) -> None:
    out = tmp_path / "never"
    base = ["task=classification", f"data.path={tiny_csv}"]
    bad = [
        (dict(overrides=[*base, "method=lora"]), "use --methods"),
        (dict(overrides=[*base, "epoch=1"]), "did you mean 'epochs'"),
        (dict(overrides=[*base, "adapter.rank=4"]), r"unknown key 'rank'.*--set-method METHOD\.adapter"),
        (dict(overrides=base, method_overrides=["dora.adapter.rank=4"]), "not one of the compared methods"),
        (dict(overrides=base, method_overrides=["lora.epochs=3"]), "same for every method.*--set epochs=3"),
        (dict(overrides=base, method_overrides=["lora.data.max_train_examples=3"]), "same for every method"),
        (dict(overrides=base, method_overrides=["lora"]), "METHOD.key=value"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            run_comparison("full,lora,bitfit", out, **kwargs)
    with pytest.raises(ValueError, match="not found"):  # the data is read before the first run
        run_comparison("bitfit", out, ["task=classification", f"data.path={tmp_path / 'missing.csv'}"])
    assert not out.exists()


def test_defaults_and_overrides_per_method(tiny_csv: Path, tmp_path: Path) -> None:
    base = ["task=classification", f"data.path={tiny_csv}"]
    plan = {p.method: p.config for p in plan_comparison(
        "full,lora,dora", tmp_path, [*base, "adapter.dropout=0.1", "weight_decay=0.02"],
        ["lora.adapter.rank=4", "dora.lr=1e-2"])}
    assert plan["full"].adapter == {} and plan["full"].lr == 5e-5  # adapter.* skips full; its own lr
    assert plan["lora"].adapter_config().rank == 4 and plan["lora"].adapter_config().dropout == 0.1
    assert plan["dora"].adapter_config().rank == 8 and plan["dora"].adapter_config().dropout == 0.1
    assert plan["dora"].lr == 1e-2 and plan["lora"].lr == 1e-3
    assert all(c.weight_decay == 0.02 for c in plan.values())
    assert plan["lora"].output == str(tmp_path / "lora")
    assert plan_comparison("full", tmp_path, [*base, "lr=2e-5"])[0].config.lr == 2e-5  # --set wins over defaults

    # With 'all', a method these settings do not fit is a planned error row; if none fits, it raises.
    everything = plan_comparison("all", tmp_path, [*base, "adapter.rank=4"])
    assert [p.method for p in everything] == ["full", *dt.METHODS]
    assert next(p for p in everything if p.method == "lora").config is not None
    bitfit = next(p for p in everything if p.method == "bitfit")
    assert bitfit.config is None and bitfit.error.startswith("not applicable:") and "rank" in bitfit.error
    with pytest.raises(ValueError, match="epochs"):
        plan_comparison("all", tmp_path, [*base, "epochs=0"])


def test_cli_prints_the_table_and_rejects_bad_names(tiny_bert: Path, tiny_csv: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["compare", "--methods", "lroa"])
    assert result.exit_code == 2 and "did you mean 'lora'" in result.output
    out = tmp_path / "cmp"
    args = ["compare", "--methods", "bitfit", "--task", "classification", "--model", str(tiny_bert),
            "--set", f"data.path={tiny_csv}", "--set", "epochs=1", "--set", "batch_size=8", "--in-process",
            "--output", str(out)]
    result = runner.invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "| bitfit | specification |" in result.output and "compare.md" in result.output
    assert {"compare.json", "compare.md", "compare.png", "bitfit"} <= {p.name for p in out.iterdir()}
