"""``bench.plan_accuracy``'s comparison columns, on hand-written plan rows and run metrics (no run)."""

from __future__ import annotations

import pytest

from bench.plan_accuracy import compare_row, cpu_columns, measured_step


def test_cpu_columns_compare_the_work_and_say_how_loaded_each_side_was() -> None:
    plan = {"step_seconds": 1.0, "step_cpu_seconds": 0.4, "cpu_share": 0.4, "load_average": [4.0, 4.0, 4.0]}
    metrics = {"steps": 10, "train_seconds": 20.0, "train_cpu_seconds": 5.0, "load_average": [1.0, 2.0, 3.0],
               "step_times": {"first": 2.9, "median": 1.8, "mean_after_first": 1.9}}
    cols = cpu_columns(plan, metrics)  # no per-step CPU times: the whole run's CPU time per step, said so
    assert cols["step_cpu_measured_s"] == 0.5 and cols["step_cpu_ratio"] == pytest.approx(0.8)
    assert cols["step_cpu_counts"] == "train_cpu_seconds / steps"
    assert cols["cpu_share_probe"] == 0.4 and cols["cpu_share_run"] == 0.25
    assert cols["step_measured_first_s"] == 2.9 and cols["load_average_run"] == [1.0, 2.0, 3.0]


def test_the_measured_cpu_step_is_the_steady_one_where_the_run_recorded_each_steps_cpu_time() -> None:
    # The first step's CPU time (a one-off 3.0 s) is not part of the steady step the probe predicts.
    metrics = {"steps": 10, "train_seconds": 20.0, "train_cpu_seconds": 7.5,
               "step_cpu_times": {"first": 3.0, "median": 0.5, "mean_after_first": 0.5}}
    cols = cpu_columns({"step_seconds": 1.0, "step_cpu_seconds": 0.4, "first_step_extra_cpu_seconds": 2.4}, metrics)
    assert cols["step_cpu_measured_s"] == 0.5 and cols["step_cpu_ratio"] == pytest.approx(0.8)
    assert cols["step_cpu_measured_first_s"] == 3.0 and cols["first_step_extra_cpu_predicted_s"] == 2.4


def test_cpu_columns_of_runs_from_before_cpu_time_was_recorded_are_empty() -> None:
    cols = cpu_columns({"step_seconds": 1.0}, {"steps": 10, "train_seconds": 20.0})
    assert cols["step_cpu_ratio"] is None and cols["cpu_share_run"] is None


def test_the_measured_step_is_the_steady_step_and_the_total_counts_the_first() -> None:
    # train_seconds (20 s over 10 steps) also counts validation; the steps took 2.9 + 9 x 1.5 = 16.4 s,
    # of which the steady step is 1.5 s. Plan predicts 1.5 s a step plus 1.4 s once: 16.4 s in all.
    metrics = {"steps": 10, "train_seconds": 20.0, "step_times": {"first": 2.9, "median": 1.5, "mean_after_first": 1.5}}
    assert measured_step(metrics) == (1.5, "mean of the steps after the first")
    assert measured_step({"steps": 10, "train_seconds": 20.0})[0] == 2.0
    plan = {"method": "full", "trainable_parameters": 5, "adapter_bytes": 10, "peak_memory_mb": 100.0,
            "step_seconds": 1.5, "first_step_extra_seconds": 1.4, "train_seconds": 16.4}
    run = {"metrics": metrics, "trainable_parameters": 5, "adapter_bytes": 10, "peak_memory_mb": 100.0,
           "train_seconds": 20.0}
    row = compare_row(plan, run)
    assert row["step_ratio"] == pytest.approx(1.0) and row["steps_total_measured_s"] == pytest.approx(16.4)
    assert row["steps_total_ratio"] == pytest.approx(1.0)
    # A probe that ignored the first step would predict 15 s: 0.91 of the run's steps.
    row = compare_row({**plan, "first_step_extra_seconds": 0.0}, run)
    assert row["steps_total_ratio"] == pytest.approx(15 / 16.4)
