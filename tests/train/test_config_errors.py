"""Configs that cannot work fail before any work: one line, exit status 2, naming the fix."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import deltatune as dt
from deltatune.cli import app
from deltatune.config import AdapterConfig, ConfigTypeError
from deltatune.methods import METHODS
from deltatune.train import load_config
from tests.cli_fails import fails

runner = CliRunner()


# --- wrong-typed adapter values -------------------------------------------------------------------


@pytest.mark.parametrize(("assignment", "expected"), [
    ("adapter.rank=abc", "adapter.rank must be an integer, got 'abc'"),
    ("adapter.rank=1.5", "adapter.rank must be an integer, got 1.5"),
    ("adapter.rank=true", "adapter.rank must be an integer, got True"),
    ("adapter.dropout='0.1'", "adapter.dropout must be a number, got '0.1'"),
    ("adapter.target=123", "adapter.target must be a string or a list of strings"),
    ("adapter.rank_pattern={q: x}", "adapter.rank_pattern must be a mapping of a string to an integer"),
    ("adapter.init=svd", "adapter.init must be one of 'default', 'gaussian', 'pissa', 'olora'"),
])
def test_wrong_typed_adapter_value_is_one_line_before_any_data(assignment: str, expected: str,
                                                                tmp_path: Path) -> None:
    # data.path points nowhere: the type error must come first (before any data or model load)
    line = fails("train", "--set", "task=classification", "--set", f"data.path={tmp_path / 'none.csv'}",
                 "--set", f"model={tmp_path / 'no-model'}", "--set", assignment)
    assert expected in line


def test_library_configs_reject_wrong_types_with_a_clear_message() -> None:
    with pytest.raises(TypeError, match=r"lora: rank must be an integer, got '8' \(str\)"):
        dt.LoraConfig(rank="8")
    with pytest.raises(ValueError, match="dropout must be a number"):  # also a ValueError (the CLI's kind)
        dt.LoraConfig(dropout="0.1")
    with pytest.raises(ConfigTypeError, match="rslora must be true or false"):
        dt.LoraConfig(rslora=1)
    with pytest.raises(ConfigTypeError, match="layers must be a list of integers or None"):
        dt.LoraConfig(layers=[1, "2"])
    # what the types allow still works: int for float, a single item or a list for a tuple field
    config = dt.LoraConfig(alpha=16, exclude="classifier", target=["query", "value"], layers=1)
    assert config.exclude == ("classifier",) and config.target == ("query", "value") and config.layers == (1,)
    assert dt.LoraConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_checks_its_int_and_float_fields(method: str) -> None:
    """Generic: no method needs code for it, so every registered one rejects a string for a number."""
    cls: type[AdapterConfig] = METHODS[method]
    numeric = [f.name for f in dataclasses.fields(cls) if f.type in ("int", "float", int, float)]
    for name in numeric:
        with pytest.raises(ConfigTypeError, match=f"{name} must be"):
            cls.from_dict({name: "1"})


def test_a_user_config_with_an_unresolvable_annotation_still_works() -> None:
    class Local:  # a name get_type_hints cannot see from the module
        pass

    @dataclasses.dataclass(frozen=True)
    class MyLora(dt.LoraConfig):
        extra: Local | None = None

    assert MyLora(extra=None).extra is None
    with pytest.raises(ConfigTypeError, match="rank must be an integer"):  # the resolvable fields are still checked
        MyLora(rank="8")


# --- values that make the adapter useless ---------------------------------------------------------


@pytest.mark.parametrize("config", [
    lambda: dt.LoraConfig(alpha=0), lambda: dt.LoraConfig(alpha_pattern={"query": 0.0}),
    lambda: METHODS["dora"](alpha=0), lambda: METHODS["loha"](alpha=0), lambda: METHODS["lokr"](alpha=0),
    lambda: METHODS["adalora"](alpha=0),
])
def test_alpha_zero_is_an_error(config) -> None:
    with pytest.raises(ValueError, match="alpha must not be 0"):
        config()


def test_alpha_zero_under_the_cli() -> None:
    assert "alpha must not be 0" in fails("train", "--set", "adapter.alpha=0")


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))


def test_rank_at_or_above_a_layers_smaller_side_warns_what_it_costs() -> None:
    with pytest.warns(UserWarning) as record:
        dt.attach(_mlp(), dt.LoraConfig(rank=64, target=["0", "2"]))
    (message,) = [str(w.message) for w in record if "full rank" in str(w.message)]
    assert "rank 64 on '0' (32 -> 32) is at or above min(d_in, d_out)=32" in message
    assert "(and 1 more modules)" in message and "stores more numbers than the weight itself" in message
    with pytest.warns(UserWarning, match=r"rank 3 on '2' \(32 -> 3\) is at or above min\(d_in, d_out\)=3"):
        dt.attach(_mlp(), dt.LoraConfig(rank=3, target=["2"]))
    with pytest.warns(UserWarning, match="rank 40 on '0'"):  # rank_pattern is what counts
        dt.attach(_mlp(), dt.LoraConfig(rank=2, rank_pattern={"0": 40}, target=["0", "2"]))


def test_a_small_rank_or_a_method_without_one_does_not_warn() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dt.attach(_mlp(), dt.LoraConfig(rank=2, target=["0", "2"]))
        dt.attach(_mlp(), METHODS["vera"](rank=256, target=["0"]))  # VeRA's rank is a shared projection


# --- YAML ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("epochs: 1\nlr: 1e-3\nepochs: 2\n", "line 3: duplicate key 'epochs' (first on line 1)"),
    ("adapter:\n  rank: 4\n  rank: 8\n", "line 3: duplicate key 'rank' (first on line 2)"),
    ("epochs: [1\nlr: 2\n", "line 2: expected ',' or ']'"),
    ("epochs: !!python/object:os.system {}\n", "line 1: 'tag:yaml.org,2002:python/object:os.system' is not allowed"),
    ("epochs: !!python/name:os.system\n", "line 1: 'tag:yaml.org,2002:python/name:os.system' is not allowed"),
])
def test_bad_yaml_is_one_line_naming_file_and_line(text: str, expected: str, tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match="run.yaml, line") as err:
        load_config(path)
    assert expected in str(err.value)
    assert expected in fails("train", path)


def test_yaml_merge_keys_may_still_be_overridden(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("adapter:\n  <<: {rank: 4, alpha: 8}\n  alpha: 4\n")
    adapter = load_config(path).adapter
    assert (adapter["rank"], adapter["alpha"]) == (4, 4)


# --- device, output, model directory --------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_fails_before_data_load(tmp_path: Path) -> None:
    line = fails("train", "--set", "device=cuda", "--set", "task=classification",
                 "--set", f"data.path={tmp_path / 'missing.csv'}")
    assert "device 'cuda'" in line and "no CUDA device" in line and "device=cpu" in line


def test_device_with_a_typo_is_a_config_error() -> None:
    assert "device must be auto, cpu, cuda[:N] or mps, got 'cudax'" in fails("train", "--set", "device=cudax")


def test_output_symlink_loop_fails_before_data_load(tmp_path: Path) -> None:
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    line = fails("train", "--output", loop, "--set", "task=classification",
                 "--set", f"data.path={tmp_path / 'missing.csv'}")
    assert "cannot be used as a run directory" in line and "loop" in line


def test_output_that_is_a_file_fails(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    assert "is a file, not a directory" in fails("train", "--output", tmp_path / "file")


@pytest.mark.parametrize(("content", "expected"), [("{not json", "is not valid JSON"),
                                                   ("[1, 2]", "must hold a JSON object")])
def test_broken_model_config_json_names_the_file(content: str, expected: str, tiny_csv: Path, tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(content)
    line = fails("train", "--set", f"model={model}", "--set", "task=classification",
                 "--set", f"data.path={tiny_csv}", "--no-progress")
    assert expected in line and str(model / "config.json") in line
    json.dumps(line)  # one plain line


# --- defaults that learn: the learning rate follows the method ---------------------------------------


@pytest.mark.parametrize(("method", "lr", "reason"), [
    ("bitfit", 1e-2, "bitfit's suggested default"),
    ("full", 5e-5, "full fine-tuning's default"),
    ("lora", 1e-3, "the default"),
])
def test_lr_follows_the_method_unless_given(method: str, lr: float, reason: str, tmp_path: Path) -> None:
    from deltatune.train.config import lr_note

    config = load_config(None, [f"method={method}"])
    assert config.lr == lr and lr_note(config) == f"lr {lr:g} ({reason}; set lr= to change)"
    assert load_config(None, [f"method={method}", "lr=0.2"]).lr == 0.2  # --set wins
    assert lr_note(load_config(None, [f"method={method}", "lr=0.2"])) is None
    path = tmp_path / "run.yaml"
    path.write_text(f"method: {method}\nlr: 3.0e-4\n")
    assert load_config(path).lr == 3e-4 and lr_note(load_config(path)) is None  # YAML wins


@pytest.mark.parametrize(("method", "lr", "reason"), [
    ("full", 3e-4, "task image's default for full"),       # measured there; not the text tasks' 5e-5
    ("lora", 3e-3, "task image's default for lora"),
    ("bitfit", 1e-2, "bitfit's suggested default"),          # no image rate of its own: the method's
])
def test_a_task_s_own_lr_wins_over_the_method_s(method: str, lr: float, reason: str) -> None:
    from deltatune.train.config import lr_note

    config = load_config(None, ["task=image", f"method={method}"])
    assert config.lr == lr and lr_note(config) == f"lr {lr:g} ({reason}; set lr= to change)"
    assert load_config(None, ["task=image", f"method={method}", "lr=0.2"]).lr == 0.2  # --set wins
    assert load_config(None, [f"method={method}"]).lr != lr or method == "bitfit"  # the text task keeps its own


def test_compare_and_train_resolve_the_same_lr(tmp_path: Path) -> None:
    from deltatune.train.compare import plan_comparison

    planned = {p.method: p.config for p in plan_comparison(["full", "bitfit", "lora", "ia3"], tmp_path)}
    for method, config in planned.items():
        alone = load_config(None, [f"method={method}"])
        assert config is not None and (config.lr, config.weight_decay) == (alone.lr, alone.weight_decay), method
    assert planned["bitfit"].lr == METHODS["bitfit"].suggested_lr and planned["full"].lr == 5e-5


def _train(tiny_bert: Path, tiny_csv: Path, out: Path, *extra: str) -> str:
    result = runner.invoke(app, ["train", "--set", f"model={tiny_bert}", "--set", "task=classification",
                                 "--set", f"data.path={tiny_csv}", "--set", "epochs=1", "--set", "batch_size=8",
                                 "--set", "method=bitfit", "--set", "precision=fp32", "--output", str(out),
                                 "--no-progress", *extra])
    assert result.exit_code == 0, result.output
    return result.output


def test_train_says_which_lr_it_chose_and_records_it(tiny_bert: Path, tiny_csv: Path, tmp_path: Path) -> None:
    import yaml

    out = _train(tiny_bert, tiny_csv, tmp_path / "run")
    assert "lr 0.01 (bitfit's suggested default; set lr= to change)" in out
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["lr"] == 0.01
    out = _train(tiny_bert, tiny_csv, tmp_path / "explicit", "--set", "lr=0.002")
    assert "suggested default" not in out
    assert yaml.safe_load((tmp_path / "explicit" / "config.yaml").read_text())["lr"] == 0.002


def test_resuming_a_run_started_with_the_old_default_keeps_its_lr(tiny_bert: Path, tiny_csv: Path,
                                                                    tmp_path: Path) -> None:
    import yaml

    run = tmp_path / "run"
    _train(tiny_bert, tiny_csv, run, "--set", "lr=0.001")  # what bitfit ran at before lr followed the method
    out = _train(tiny_bert, tiny_csv, run, "--resume")  # the same command, without lr
    assert "resumed from" in out and "as recorded in" in out and "lr 0.001" in out
    assert yaml.safe_load((run / "config.yaml").read_text())["lr"] == 0.001


# --- errors under the CLI name the CLI's flags -------------------------------------------------------


def test_combine_errors_name_flags_and_paths_not_library_arguments(tiny_bert: Path, tiny_csv: Path,
                                                                     tmp_path: Path) -> None:
    runs = []
    for seed in (0, 1):
        out = tmp_path / f"run{seed}"
        result = runner.invoke(app, ["train", "--set", f"model={tiny_bert}", "--set", "task=classification",
                                     "--set", f"data.path={tiny_csv}", "--set", "epochs=1", "--set", "batch_size=8",
                                     "--set", "adapter.rank=2", "--set", f"seed={seed}", "--set", "precision=fp32",
                                     "--output", str(out), "--no-progress"])
        assert result.exit_code == 0, result.output
        runs.append(out)
    base = ["combine", *runs, "--output", tmp_path / "combined"]
    line = fails(*base, "--how", "cat")  # both runs train the classifier head in full
    assert "--heads-from N (1 = the first adapter)" in line and "heads_from" not in line
    line = fails(*base, "--how", "mean")
    assert line.startswith("error: --how must be one of") and "how=" not in line
    line = fails(*base, "--how", "cat", "--rank", "2", "--heads-from", "1")
    assert "--rank and --svd-clamp apply to the svd combinations only" in line
    assert "--majority-sign must be" in fails(*base, "--how", "ties", "--majority-sign", "most", "--heads-from", "1")
    line = fails(*base, "--how", "ties", "--density", "0", "--heads-from", "1")
    assert "needs a --density in (0, 1]" in line


def test_cli_words_leave_other_words_alone() -> None:
    from deltatune.cli.common import in_cli_words

    words = {"rank must": "--rank must", "heads_from": "--heads-from"}
    assert in_cli_words("rank must be >= 1; low-rank rank must; heads_from=x", words) == \
        "--rank must be >= 1; low-rank --rank must; --heads-from=x"
    assert in_cli_words("my_heads_from stays", words) == "my_heads_from stays"
    # a library call in the message is not the flag (it read "deltatune.--quantize(model, ...)")
    assert in_cli_words("call deltatune.quantize(model, ...) or set quantize", {"quantize": "--quantize"}) == \
        "call deltatune.quantize(model, ...) or set --quantize"


def test_the_cli_shows_the_rank_warning_as_one_line(tiny_bert: Path) -> None:
    import subprocess
    import sys

    # a real process: pytest captures warnings in-process, the user's terminal does not
    result = subprocess.run([sys.executable, "-m", "deltatune", "inspect", str(tiny_bert), "--set", "adapter.rank=64",
                             "--set", "task=classification", "--set", f"data.path={tiny_bert}"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    (line,) = [x for x in result.stderr.splitlines() if "full rank" in x]
    assert line.startswith("warning: rank 64 on 'bert.encoder.layer.0.attention.self.query' (32 -> 32)")
    assert "UserWarning" not in result.stderr
