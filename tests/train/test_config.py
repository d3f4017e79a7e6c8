"""The training config: YAML + --set overrides, strict keys, method settings checked by the method."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest

import deltatune as dt
from deltatune.train.config import TrainConfig, apply_override, load_config, parse_yaml, to_yaml


def recipes() -> list[Path]:
    return sorted(Path(str(resources.files("deltatune") / "recipes")).glob("*.yaml"))


def test_recipes_are_shipped() -> None:
    names = {p.name for p in recipes()}
    assert {"sentiment-lora.yaml", "sentiment-full.yaml", "classification-csv.yaml", "chat-lora.yaml"} <= names


@pytest.mark.parametrize("path", recipes(), ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path: Path) -> None:
    config = load_config(path)
    assert isinstance(config, TrainConfig)
    # Every key of the recipe is a real key (nothing silently ignored) and survives the round trip.
    assert load_config(path).model_dump() == config.model_dump()
    if config.method != "full":
        assert isinstance(config.adapter_config(), dt.METHODS[config.method])


@pytest.mark.parametrize(("name", "overrides"), [("sentiment-lora.yaml", []), ("chat-lora.yaml", ["task=chat"]),
                                                 ("text-lora.yaml", ["task=text"])])
def test_recipes_spell_out_the_task_defaults(name: str, overrides: list[str]) -> None:
    # `deltatune train` (no arguments) and `--set task=chat` run exactly what these recipes say.
    path = next(p for p in recipes() if p.name == name)
    assert load_config(path).model_dump() == load_config(None, overrides).model_dump()


def test_overrides_read_as_yaml_and_nest() -> None:
    config = load_config(None, ["epochs=1", "lr=2e-4", "adapter.rank=4", "adapter.target=[query, value]",
                                "data.max_train_examples=10", "method=lora"])
    assert config.epochs == 1 and config.lr == pytest.approx(2e-4)
    lora = config.adapter_config()
    assert lora.rank == 4 and lora.target == ("query", "value")
    assert lora.alpha == 16  # untouched task default survives a partial adapter override
    assert config.data.max_train_examples == 10
    assert config.data.validation_fraction == 0.05  # the sentiment task's default survives a data.* override


def test_yaml_reads_exponent_floats() -> None:
    assert parse_yaml("lr: 1e-3") == {"lr": 1e-3}
    assert parse_yaml("x: 5") == {"x": 5} and parse_yaml("x: abc") == {"x": "abc"}


def test_yaml_file_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 3\nbatch_size: 8\nadapter:\n  rank: 2\n")
    config = load_config(path, ["epochs=1"])
    assert (config.epochs, config.batch_size, config.adapter_config().rank) == (1, 8, 2)
    again = load_config(_write(tmp_path / "again.yaml", to_yaml(config)))
    assert again.model_dump() == config.model_dump()


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(("overrides", "message"), [
    (["epoch=1"], "did you mean 'epochs'"),
    (["adapter.rnk=4"], "did you mean 'rank'"),
    (["data.pth=x.csv"], "did you mean 'path'"),
    (["epochs=0"], "epochs"),
    (["lr=-1"], "lr"),
    (["lr=fast"], "lr"),
    (["batch_size=2.5"], "batch_size"),
    (["method=nosuch"], "unknown method 'nosuch'"),
    (["task=nosuch"], "unknown task 'nosuch'"),
    (["adapter.rank=0"], "rank must be >= 1"),
    (["method=full", "adapter.rank=4"], "takes no adapter settings"),
    (["task=classification"], "needs data.path"),
    (["data.path=x.csv"], "task: classification"),
    (["device=tpu"], "device must be"),
    (["precision=fp8"], "precision"),
    (["cpu_engine=mkl"], "cpu_engine"),
    (["epochs"], "key=value"),
    (["data.validation_fraction=0.5", "data.test_fraction=0.5"], "must be below 1"),
])
def test_bad_configs_fail_before_any_work(overrides: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_config(None, overrides)


def test_unknown_top_level_key_in_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown key 'lerning_rate'"):
        load_config(_write(tmp_path / "c.yaml", "lerning_rate: 0.1\n"))
    with pytest.raises(ValueError, match="must hold a mapping"):
        load_config(_write(tmp_path / "d.yaml", "- 1\n- 2\n"))
    with pytest.raises(ValueError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_full_fine_tuning_needs_no_adapter() -> None:
    config = load_config(None, ["method=full"])
    assert config.adapter == {} and config.adapter_config() is None


def test_apply_override_rejects_descending_into_a_value() -> None:
    data = {"epochs": 2}
    with pytest.raises(ValueError, match="not a mapping"):
        apply_override(data, "epochs.x=1")


def test_every_method_takes_its_settings_under_adapter() -> None:
    # The loop never names a method: each registered one validates through its own config class.
    for method in dt.METHODS:
        config = load_config(None, [f"method={method}"])
        assert config.adapter_config().method == method


def test_cpu_engine_applies_for_the_run_only(monkeypatch, tmp_path) -> None:
    """``cpu_engine`` picks the fused kernels' CPU products while training, then the old one is back."""
    from deltatune.core import products
    from deltatune.train import run

    seen = []
    monkeypatch.setattr(run, "_run_training", lambda *a: seen.append(products.current_engine()) or {})
    before = products.current_engine()
    run.run_training(load_config(None, ["cpu_engine=thin", f"output={tmp_path / 'run'}"]))  # not runs/ in the cwd
    assert seen == ["thin"] and products.current_engine() == before
