"""A damaged or foreign adapter directory is one clear error naming the file, never a traceback or
a silently wrong model; loading onto another base with the same shapes warns."""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import deltatune as dt
from deltatune.cli import app
from deltatune.core.records import configs
from tests.train.tiny import make_csv, make_tiny_bert

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8),
                               torch.nn.ReLU(), torch.nn.Linear(8, 3))


def saved(tmp_path: Path, fmt: str = "deltatune") -> Path:
    model = mlp()
    dt.attach(model, dt.LoraConfig(rank=2, target=["0", "2"]))
    return dt.save_adapter(model, tmp_path / f"adapter-{fmt}", format=fmt)


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def edit_config(change: Callable[[dict], object]) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        meta = json.loads(path.read_text())
        path.write_text(json.dumps(change(meta)))
    return edit


def _set(meta: dict, key: str, value: object) -> dict:
    meta[key] = value
    return meta


def _rank(meta: dict, value: object) -> dict:
    meta["config"]["rank"] = value
    return meta


def _with_value(value: float) -> Callable[[Path], None]:
    def poison(path: Path) -> None:
        tensors = load_file(str(path))
        key = sorted(tensors)[0]
        tensors[key][0, 0] = value
        save_file(tensors, str(path))
    return poison


DAMAGE: dict[str, tuple[str, Callable[[Path], None], str]] = {
    "zero-byte weights": (WEIGHTS, lambda p: p.write_bytes(b""), "is empty (0 bytes)"),
    "truncated weights": (WEIGHTS, truncate, "is not a readable safetensors file"),
    "missing weights": (WEIGHTS, lambda p: p.unlink(), "not found"),
    "bad JSON": (CONFIG, lambda p: p.write_text('{"format": "deltatune",'), "is not valid JSON"),
    "not an object": (CONFIG, lambda p: p.write_text("[1, 2]"), "must hold a JSON object, not a list"),
    "rank as a string": (CONFIG, edit_config(lambda m: _rank(m, "8")), "rank must be an integer, got '8'"),
    "unknown method": (CONFIG, edit_config(lambda m: _set(m, "config", {**m["config"], "method": "lorax"})),
                       "unknown method 'lorax'"),
    "targets not names": (CONFIG, edit_config(lambda m: _set(m, "targets", "0")), "'targets' must be a list"),
    "NaN in a tensor": (WEIGHTS, _with_value(float("nan")), "holds 1 NaN value(s)"),
    "inf in a tensor": (WEIGHTS, _with_value(float("inf")), "holds 1 inf value(s)"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_adapter_is_one_error_naming_the_file(case: str, tmp_path: Path) -> None:
    file, damage, expected = DAMAGE[case]
    directory = saved(tmp_path)
    damage(directory / file)
    model = mlp()
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        dt.load_adapter(model, directory)
    message = str(err.value)
    assert expected in message and str(directory / file) in message and "\n" not in message
    assert not configs(model) and not any(p.dtype != torch.float32 for p in model.parameters())  # nothing attached
    if "tensor" in case:
        key = sorted(load_file(str(directory / WEIGHTS)))[0]
        assert repr(key) in message  # names the tensor


@pytest.mark.parametrize("case", ["zero-byte weights", "truncated weights", "bad JSON", "NaN in a tensor"])
def test_damaged_peft_adapter_is_one_error_naming_the_file(case: str, tmp_path: Path) -> None:
    file, damage, expected = DAMAGE[case]
    directory = saved(tmp_path, "peft")
    damage(directory / file)
    with pytest.raises(ValueError, match=expected.replace("(", r"\(").replace(")", r"\)")) as err:
        dt.load_adapter(mlp(), directory)
    assert str(directory) in str(err.value)


def test_a_different_base_with_the_same_shapes_warns_naming_what_differs(tmp_path: Path) -> None:
    directory = saved(tmp_path)
    assert set(json.loads((directory / CONFIG).read_text())["base_fingerprint"]["hashes"]) == {"0", "2"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dt.load_adapter(mlp(0), directory)  # the same base: silent
        dt.load_adapter(mlp(0).to(torch.bfloat16).float(), directory, "again")  # same weights, other precision
    with pytest.warns(UserWarning, match=r"not the one the adapter was saved with: the weights of '0' differ "
                                         r"\(and 1 more\)"):
        dt.load_adapter(mlp(1), directory)


def test_an_old_file_without_a_fingerprint_loads_silently(tmp_path: Path) -> None:
    directory = saved(tmp_path)
    edit_config(lambda m: {k: v for k, v in m.items() if k != "base_fingerprint"})(directory / CONFIG)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dt.load_adapter(mlp(1), directory)


# --- the CLI: eval, predict, merge, convert ---------------------------------------------------------

runner = CliRunner()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("load-errors")
    model, data, out = make_tiny_bert(root / "bert"), make_csv(root / "texts.csv", n=40), root / "run"
    result = runner.invoke(app, ["train", "--set", f"model={model}", "--set", "task=classification",
                                 "--set", f"data.path={data}", "--set", "epochs=1", "--set", "batch_size=8",
                                 "--set", "adapter.rank=2", "--set", "precision=fp32", "--output", str(out),
                                 "--no-progress"])
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("case", ["truncated weights", "bad JSON", "rank as a string", "NaN in a tensor"])
@pytest.mark.parametrize("command", ["eval", "predict", "merge", "convert"])
def test_cli_commands_report_a_damaged_adapter_in_one_line(command: str, case: str, trained: Path,
                                                           tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    file, damage, expected = DAMAGE[case]
    damage(run / "adapter" / file)
    inputs = tmp_path / "in.jsonl"
    inputs.write_text('{"text": "good day"}\n')
    args = {"eval": ["eval", run], "predict": ["predict", run / "adapter", "--input", inputs, "--output", tmp_path / "p.jsonl"],
            "merge": ["merge", run, "--output", tmp_path / "merged"],
            "convert": ["convert", run / "adapter", tmp_path / "peft", "--to", "peft"]}[command]
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output
    assert expected in lines[0] and str(run / "adapter" / file) in lines[0]
