"""``--budget`` parsing and checking, and the search space each method declares beside its config."""

from __future__ import annotations

import dataclasses

import pytest

from deltatune.methods import METHODS
from deltatune.train.budget import Budget, parse_budget
from deltatune.train.space import Candidate, candidate, candidates, method_space, parse_methods


def test_parse_the_issue_example() -> None:
    b = parse_budget("memory=4GB,time=10m,adapter=5MB,params=1%")
    assert b.memory_bytes == 4e9 and b.seconds == 600 and b.adapter_bytes == 5e6 and b.params_share == 0.01
    assert b.params is None and b.text == "memory=4GB,time=10m,adapter=5MB,params=1%"


@pytest.mark.parametrize(("text", "field", "value"), [
    ("memory=512MiB", "memory_bytes", 512 * 2**20), ("memory=1.5gib", "memory_bytes", 1.5 * 2**30),
    ("memory=2000", "memory_bytes", 2000), ("time=90", "seconds", 90), ("time=1.5h", "seconds", 5400),
    ("time=30s", "seconds", 30), ("time=2min", "seconds", 120), ("params=2M", "params", 2e6),
    ("params=500k", "params", 5e5), ("params=12000", "params", 12000), (" adapter = 3kb ", "adapter_bytes", 3000),
])
def test_units(text: str, field: str, value: float) -> None:
    assert getattr(parse_budget(text), field) == pytest.approx(value)


@pytest.mark.parametrize(("text", "needle"), [
    ("memory=4XB", "budget 'memory=4XB': '4XB' is not understood; write e.g. memory=4GB"),
    ("time=ten", "write e.g. time=10m"),
    ("memroy=4GB", "unknown key 'memroy'; did you mean 'memory'?"),
    ("memory=4GB,memory=2GB", "'memory' is given twice"),
    ("memory", "expected key=value"),
    ("params=0%", "above 0%"),
    ("params=150%", "at most 100%"),
    ("time=0", "a limit of 0"),
])
def test_a_bad_budget_is_one_line(text: str, needle: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_budget(text)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_no_budget_means_no_limits() -> None:
    assert not parse_budget(None) and not parse_budget("") and parse_budget("time=1h")


def test_loads_and_over() -> None:
    b = parse_budget("memory=1GiB,time=10m,adapter=1MB,params=1%")
    row = {"peak_memory_mb": 512.0, "train_seconds": 900.0, "adapter_bytes": 2e6, "trainable_parameters": 10,
           "trainable_share": 0.005}
    assert b.loads(row) == pytest.approx({"memory": 0.5, "time": 1.5, "adapter": 2.0, "params": 0.5})
    assert b.over(row) == ["time", "adapter"]
    assert Budget().over(row) == [] and Budget().loads(row) == {}


def test_every_declared_search_value_makes_a_valid_config() -> None:
    # The shared description: each (field, value) a method declares is a valid value of its config.
    declared = 0
    for method, cls in METHODS.items():
        names = {f.name for f in dataclasses.fields(cls)}
        for field, choices in method_space(method).items():
            assert field in names, f"{method}.search_space names {field!r}, which is not a field"
            for value in choices.values():
                cls(**{field: value})
                declared += 1
    assert declared >= 20
    assert method_space("full") == {}


def test_candidates_vary_one_field_at_a_time() -> None:
    cands = candidates(["lora", "bitfit"])
    assert [c.label for c in cands] == ["lora", "lora rank=4", "lora rank=16", "lora target=attention-qv", "bitfit"]
    assert candidates(["lora", "full"], variants="defaults") == [Candidate("lora"), Candidate("full")]
    qv = cands[3]
    assert qv.values["target"][:2] == ("attention.self.query", "attention.self.value")
    data = qv.apply({"model": "m", "adapter": {"alpha": 8}})
    assert data["method"] == "lora" and data["adapter"] == {"alpha": 8, "target": qv.values["target"]}
    assert candidate("lora", {"rank": "16"}).slug == "lora-rank16"


def test_bad_names_in_the_space_say_what_exists() -> None:
    with pytest.raises(ValueError, match="lora has no search dimension 'rnak'; it has: rank, target"):
        candidate("lora", {"rnak": "4"})
    with pytest.raises(ValueError, match="choices: 8, 4, 16"):
        candidate("lora", {"rank": "5"})
    with pytest.raises(ValueError, match="unknown method 'lorax'"):
        parse_methods("lorax")
    assert parse_methods("all")[0] == "full" and parse_methods("lora, bitfit") == ["lora", "bitfit"]
