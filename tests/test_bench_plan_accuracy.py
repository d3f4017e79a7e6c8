"""``bench.plan_accuracy``'s comparison columns, on hand-written plan rows and run metrics (no run)."""

from __future__ import annotations

import pytest

from bench.plan_accuracy import cpu_columns, measured_step


def test_cpu_columns_compare_the_work_and_say_how_loaded_each_side_was() -> None:
    plan = {"step_seconds": 1.0, "step_cpu_seconds": 0.4, "cpu_share": 0.4, "load_average": [4.0, 4.0, 4.0]}
    metrics = {"steps": 10, "train_seconds": 20.0, "train_cpu_seconds": 5.0, "load_average": [1.0, 2.0, 3.0],
               "step_times": {"first": 2.9, "median": 1.8, "mean_after_first": 1.9}}
    cols = cpu_columns(plan, metrics)
    assert cols["step_cpu_measured_s"] == 0.5 and cols["step_cpu_ratio"] == pytest.approx(0.8)
    assert cols["cpu_share_probe"] == 0.4 and cols["cpu_share_run"] == 0.25
    assert cols["step_ratio_after_first"] == pytest.approx(1 / 1.9) and cols["step_measured_first_s"] == 2.9
    assert cols["load_average_run"] == [1.0, 2.0, 3.0]


def test_cpu_columns_of_runs_from_before_cpu_time_was_recorded_are_empty() -> None:
    cols = cpu_columns({"step_seconds": 1.0}, {"steps": 10, "train_seconds": 20.0})
    assert cols["step_cpu_ratio"] is None and cols["cpu_share_run"] is None and cols["step_ratio_after_first"] is None


def test_the_measured_step_is_the_steps_alone_where_the_run_recorded_them() -> None:
    # train_seconds (20 s over 10 steps) also counts validation; the steps took 2.9 + 9 x 1.5 = 16.4 s.
    metrics = {"steps": 10, "train_seconds": 20.0, "step_times": {"first": 2.9, "median": 1.5, "mean_after_first": 1.5}}
    assert measured_step(metrics) == (pytest.approx(1.64), "mean of the steps")
    assert measured_step({"steps": 10, "train_seconds": 20.0})[0] == 2.0
