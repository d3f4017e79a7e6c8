"""``deltatune plan`` on a tiny random BERT: exact parameter counts and adapter bytes (checked against a
real run), predictions present and consistent, budget marks, the no-fit message, and bad input first."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from deltatune.cli import app
from deltatune.train.config import load_config
from deltatune.train.plan import no_fit_message, run_plan
from deltatune.train.run import run_training
from tests.train.tiny import make_texts


def shared(model: Path, data: Path) -> list[str]:
    return [f"model={model}", "task=classification", f"data.path={data}", "epochs=2", "batch_size=8",
            "precision=fp32"]


@pytest.fixture(scope="module")
def planned(tiny_bert: Path, tiny_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("plan")
    return run_plan(shared(tiny_bert, tiny_csv), "lora,bitfit,full", "defaults", "memory=64GB,time=1h", steps=1,
                    output=out, say=lambda _: None) | {"_out": str(out)}


def test_plan_rows_are_exact_where_they_can_be(planned: dict, tiny_bert: Path, tiny_csv: Path,
                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = {r["label"]: r for r in planned["rows"]}
    assert set(rows) == {"lora", "bitfit", "full"} and all(r["status"] == "ok" for r in rows.values())
    # A real run of lora (in its default output directory, as the plan assumes) reports the same counts.
    monkeypatch.chdir(tmp_path)
    metrics = run_training(load_config(None, [*shared(tiny_bert, tiny_csv), "method=lora"]), progress=False)
    assert rows["lora"]["trainable_parameters"] == metrics["trainable_parameters"]
    assert rows["lora"]["total_parameters"] == metrics["total_parameters"]
    assert rows["lora"]["adapter_bytes"] == metrics["adapter_bytes"]
    assert rows["lora"]["steps_per_epoch"] == metrics["steps"] // 2 == 6  # 48 training examples / 8
    for r in rows.values():
        assert r["peak_memory_mb"] > 0 and r["step_seconds"] > 0 and r["step_cpu_seconds"] > 0
        assert 0 < r["cpu_share"] and len(r["load_average"]) == 3  # how loaded the machine was while it probed
        assert r["epoch_seconds"] == pytest.approx(r["step_seconds"] * 6)
        assert r["first_step_extra_seconds"] >= 0 and r["first_step_extra_cpu_seconds"] >= 0
        assert r["train_seconds"] == pytest.approx(r["epoch_seconds"] * 2 + r["first_step_extra_seconds"])
        assert r["fits"] is True and r["reason"].startswith("fits; tightest is ")
    assert rows["full"]["trainable_share"] == 1.0
    assert rows["bitfit"]["trainable_parameters"] < rows["lora"]["trainable_parameters"] < rows["full"]["trainable_parameters"]
    # Ranked by predicted training time among rows that fit.
    times = [r["train_seconds"] for r in planned["rows"]]
    assert times == sorted(times) and [r["rank"] for r in planned["rows"]] == [1, 2, 3]


def test_plan_writes_json_and_markdown(planned: dict) -> None:
    out = Path(planned["_out"])
    saved = json.loads((out / "plan.json").read_text())
    assert [r["label"] for r in saved["rows"]] == [r["label"] for r in planned["rows"]]
    assert saved["budget"]["memory_bytes"] == 64e9 and saved["device"] == "cpu"
    text = (out / "plan.md").read_text()
    assert "| 1 | " in text and "yes" in text


def test_a_budget_nothing_fits_names_the_cheapest(planned: dict) -> None:
    from deltatune.train.budget import parse_budget
    from deltatune.train.plan import rank_rows

    rows = [dict(r) for r in planned["rows"]]
    ranked = rank_rows(rows, parse_budget("params=1"))
    assert not any(r["fits"] for r in ranked) and all(r["reason"].startswith("over budget: params") for r in ranked)
    result = {**planned, "rows": ranked, "budget": parse_budget("params=1").to_dict(), "cheapest": "bitfit"}
    message = no_fit_message(result)
    assert message.startswith("no option fits the budget params=1; the cheapest is bitfit: peak memory ")
    assert "of parameters train (over on params)" in message


def test_cli_plan_no_fit_exits_1_with_the_cheapest(tiny_bert: Path, tiny_csv: Path, tmp_path: Path) -> None:
    sets = [a for s in shared(tiny_bert, tiny_csv)[1:] for a in ("--set", s)]
    result = CliRunner().invoke(app, ["plan", str(tiny_bert), *sets, "--methods", "bitfit,ln", "--variants",
                                      "defaults", "--steps", "1", "--budget", "params=2", "-o", str(tmp_path / "p")])
    assert result.exit_code == 1, result.output
    assert "no option fits the budget params=2; the cheapest is " in result.output
    assert (tmp_path / "p" / "plan.json").is_file()


def test_cli_plan_bad_input_fails_before_loading(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["plan", str(tmp_path / "no-model"), "--budget", "memory=4XB"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: --budget 'memory=4XB': '4XB' is not understood; write e.g. memory=4GB "
        "(units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"]
    result = CliRunner().invoke(app, ["plan", "--set", "method=lora"])
    assert result.exit_code == 2 and "the plan sets it for each option" in result.output
    result = CliRunner().invoke(app, ["plan", "--methods", "lorra"])
    assert result.exit_code == 2 and "unknown method 'lorra'" in result.output


def test_compare_grid_runs_the_same_space(tiny_bert: Path, tiny_csv: Path, tmp_path: Path) -> None:
    # compare --grid, plan and tune read one description: each method's declared search space.
    from deltatune.train.compare import plan_comparison
    from deltatune.train.space import candidates

    sets = [s for s in shared(tiny_bert, tiny_csv) if not s.startswith("epochs")]
    planned = plan_comparison("lora,bitfit", tmp_path, sets, grid=True)
    assert [p.option for p in planned] == [c.label for c in candidates(["lora", "bitfit"])]
    by = {p.option: p.config for p in planned}
    assert by["lora rank=16"].adapter_config().rank == 16 and by["lora"].adapter_config().rank == 8
    assert by["lora rank=16"].output == str(tmp_path / "lora-rank16") and by["bitfit"].output == str(tmp_path / "bitfit")
    assert [p.option for p in plan_comparison("lora,bitfit", tmp_path, sets)] == ["lora", "bitfit"]


def test_what_stays_is_measured_while_the_runs_state_is_alive(tiny_bert: Path, tiny_csv: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # "kept" (optimizer state, the adapter, gradients' storage) is the resident memory left after the
    # steps: read once everything else is freed, but before the model and its optimizer are dropped.
    import gc

    import torch

    from deltatune.train.probe import Prober

    alive = []
    memory = Prober._memory

    def spy(self: Prober, *args: Any) -> dict:
        alive.append(sum(isinstance(o, torch.optim.Optimizer) for o in gc.get_objects()))
        return memory(self, *args)

    monkeypatch.setattr(Prober, "_memory", spy)
    [row] = run_plan(shared(tiny_bert, tiny_csv), "full", "defaults", steps=1, say=lambda _: None)["rows"]
    assert row["status"] == "ok" and alive == [1]


def test_the_first_steps_extra_is_the_warm_up_less_a_steady_step_of_its_size() -> None:
    from deltatune.train.probe import first_step_extra

    # Timed steps ran at 0.01 s (wall) and 0.004 s (CPU) per token; the warm-up's 200 tokens took 5 s and
    # 2 s: 3 s and 1.2 s more than a steady step of that size.
    timing = {"rates": [0.011, 0.01, 0.009], "cpu_rates": [0.004, 0.004, 0.005]}
    extra = first_step_extra({"wall": 5.0, "cpu": 2.0, "tokens": 200}, timing)
    assert extra["wall"] == pytest.approx(3.0) and extra["cpu"] == pytest.approx(1.2)
    # A warm-up no slower than a steady step has no extra (never negative).
    assert first_step_extra({"wall": 1.0, "cpu": 0.5, "tokens": 200}, timing) == {"wall": 0.0, "cpu": 0.0}


def test_a_one_off_cost_in_the_probe_is_not_counted_in_its_steady_step(tiny_bert: Path, tiny_csv: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # A step that pays a one-off cost (a lazy allocation, a kernel built on first use, the heap handed
    # back by a cleanup just before) must not be read as what every step of the run costs: in a timed
    # step it is dropped, in the warm-up it is the first step's extra, paid once.
    import deltatune.train.probe as probe

    one_off = 10.0  # seconds, added to the step's measured wall time: far above a tiny step's milliseconds
    events: list[str] = []
    real_step, real_release = probe._step, probe.release

    def step(s: Any, *args: Any) -> None:
        real_step(s, *args)
        if events.count("step") in (0, 1):  # the warm-up, then the first timed step
            s.elapsed += one_off
        events.append("step")

    monkeypatch.setattr(probe, "_step", step)
    monkeypatch.setattr(probe, "release", lambda: (events.append("release"), real_release()))
    [row] = run_plan(shared(tiny_bert, tiny_csv), "lora", "defaults", steps=3, say=lambda _: None)["rows"]
    assert row["status"] == "ok" and events.count("step") == 4
    # Nothing is freed or handed back between the warm-up and the last timed step.
    first, last = events.index("step"), len(events) - events[::-1].index("step")
    assert events[first:last] == ["step"] * 4
    # The timed steps' median drops the one-off (their mean would give over a third of it per step).
    assert row["step_seconds"] < one_off / 10
    assert max(row["probe_rates"]) > 100 * min(row["probe_rates"])  # it was in the timed steps' figures
    # The warm-up's one-off is the run's first-step extra, counted once in the run's time. Within 2 %:
    # the extra is the warm-up less its batch at the timed steps' median rate, and that estimate of a
    # millisecond step can exceed the warm-up's own time by a few milliseconds (the timed steps meet
    # batch shapes new to the process, as a run's first steps do).
    assert row["first_step_extra_seconds"] == pytest.approx(one_off, rel=0.02)
    assert row["train_seconds"] == pytest.approx(row["step_seconds"] * 6 * 2 + row["first_step_extra_seconds"])


def test_the_heap_growth_scales_only_the_freed_heap_not_the_evaluation_or_the_shapes() -> None:
    # all-MiniLM-L6-v2 `prefix` on the AMD EPYC (MiB): its probe's large evaluation batch (294 above the
    # heap) is paid once at the run's end; scaling it with the steps' heap growth over-predicted the run by 23 %.
    from deltatune.train.peak_memory import cpu_peak

    parts = {"load_peak": 600, "after_load": 511, "kept": 46, "residue": 271, "shapes": 132, "step_extra": 0,
             "eval_extra": 294}
    assert cpu_peak(parts, 1.64) == pytest.approx(511 + 46 + 1.64 * 271 + 132 + 294)
    assert cpu_peak(parts | {"eval_extra": 0, "step_extra": 500}, 1.0) == pytest.approx(511 + 46 + 271 + 132 + 500)
    assert cpu_peak(parts | {"load_peak": 2000}, 1.0) == 2000  # never below the peak of loading


def test_a_new_batch_shapes_cost_is_the_timed_steps_growth_per_new_shape() -> None:
    from deltatune.train.peak_memory import batch_shapes, shape_cost

    MiB = 2**20
    # a step meeting a shape seen before grows nothing; one meeting two new shapes grows twice as much
    assert shape_cost([8 * MiB, 0, 16 * MiB, None], [1, 0, 2, 1]) == 8 * MiB
    assert shape_cost([0, 0], [0, 0]) == 0 and shape_cost([None], [1]) == 0
    lengths = [5, 9, 7, 3, 9]
    assert batch_shapes(lengths, [0, 1, 2, 3, 4], 2) == {(2, 9), (2, 7), (1, 9)}


def test_the_probe_measures_what_each_new_batch_shape_keeps_and_counts_the_runs_new_shapes(
        tiny_bert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A per-shape cache as torch's and oneDNN's kernels keep one: 16 MiB held for good the first time the
    # process meets a batch shape. The probe must read it from its timed steps and charge it for every
    # shape the whole run (both epochs) meets that the probe did not.
    import torch

    import deltatune.train.probe as probe
    from deltatune.train.data import epoch_batches

    MiB, cache, collated = 2**20, {}, {}
    real_step, real_memory = probe._step, probe.Prober._memory

    def step(s: Any, indices: list[int], collate: Any, *args: Any) -> None:
        real_step(s, indices, collate, *args)
        shape = tuple(collate(indices)["input_ids"].shape)
        if shape not in cache:
            cache[shape] = torch.ones(16 * MiB // 4)
        collated["collate"] = collate

    def memory(self: probe.Prober, *args: Any) -> dict:  # the run's batches, as the loop will cut them
        config = self.config  # the plan's shared settings: epochs, batch size, seed
        lengths = [self.task.item_length(it) for it in self.items["train"]]
        order = [tuple(collated["collate"](b)["input_ids"].shape)
                 for e in range(config.epochs) for b in epoch_batches(lengths, config.batch_size, config.seed, e)]
        collated["run"] = set(order)
        collated["last_new"] = max(i + 1 for i, shape in enumerate(order) if shape not in order[:i])
        return real_memory(self, *args)

    monkeypatch.setattr(probe, "_step", step)
    monkeypatch.setattr(probe.Prober, "_memory", memory)
    varied = tmp_path / "varied.csv"  # texts of 4 to 14 words: batches of many padded lengths
    with varied.open("w", newline="") as fh:
        csv.writer(fh).writerows([("text", "label")] + [(text + " the" * (i % 11), label)
                                                        for i, (text, label) in enumerate(make_texts(60))])
    [row] = run_plan(shared(tiny_bert, varied), "lora", "defaults", steps=2, say=lambda _: None)["rows"]
    parts = row["memory_parts_mb"]
    assert row["status"] == "ok" and 16 <= parts["per_shape"] < 20
    assert parts["new_shapes"] == len(collated["run"] - set(cache)) >= 1  # both epochs, less the probe's shapes
    assert parts["shapes"] == pytest.approx(parts["per_shape"] * parts["new_shapes"], abs=0.2)
    # the heap grows until the run meets its last new shape, not for as long as the run lasts
    assert parts["growth_steps"] == collated["last_new"] and parts["heap_growth"] == pytest.approx(
        probe.heap_growth(collated["last_new"]), abs=1e-3)
    no_shapes = {k: v for k, v in parts.items() if k in ("after_load", "kept", "residue", "step_extra", "eval_extra")}
    assert row["peak_memory_mb"] == pytest.approx(
        no_shapes["after_load"] + no_shapes["kept"] + parts["heap_growth"] * no_shapes["residue"] + parts["shapes"]
        + max(no_shapes["step_extra"], no_shapes["eval_extra"]), abs=0.5)
