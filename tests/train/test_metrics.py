from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import torch

import deltatune
from deltatune.train.metrics import accuracy, macro_f1, peak_memory_mb, process_status_bytes, step_times


def test_accuracy_and_macro_f1_by_hand() -> None:
    target = torch.tensor([0, 0, 0, 1, 1, 2])
    pred = torch.tensor([0, 0, 1, 1, 2, 2])
    assert accuracy(pred, target) == 4 / 6
    # class 0: tp 2 fp 0 fn 1 -> 4/5; class 1: tp 1 fp 1 fn 1 -> 2/4; class 2: tp 1 fp 1 fn 0 -> 2/3
    assert math.isclose(macro_f1(pred, target, 3), (4 / 5 + 2 / 4 + 2 / 3) / 3)


def test_macro_f1_of_a_constant_prediction() -> None:
    target = torch.tensor([0, 1, 2, 0])
    pred = torch.zeros(4, dtype=torch.long)
    # only class 0 is predicted: F1 = 2*2/(2*2+2+0) = 2/3; classes 1 and 2 score 0
    assert math.isclose(macro_f1(pred, target, 3), (2 / 3) / 3)
    # a class that neither occurs nor is predicted does not count
    assert math.isclose(macro_f1(pred, target, 5), (2 / 3) / 3)


def test_peak_memory_on_cpu_is_the_process_peak_rss() -> None:
    mib, what = peak_memory_mb(torch.device("cpu"))
    assert 50 < mib < 1_000_000 and "VmHWM" in what


_CHILD = """
import torch
from deltatune.train.metrics import peak_memory_mb
print(peak_memory_mb(torch.device("cpu"))[0])
"""


def test_a_subprocess_reports_its_own_peak_not_its_launchers() -> None:
    """ru_maxrss survives execve: a run that compare, tune or a notebook starts from a large process
    would report that process's memory. The child here is about the size of torch; the parent holds
    1 GiB more than that when it starts the child."""
    held = bytearray(1 << 30)
    held[::4096] = b"\x01" * len(held[::4096])  # touch every page: resident, not just reserved
    parent = process_status_bytes("VmRSS") / 2**20
    out = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(Path(deltatune.__file__).parents[1])})
    child = float(out.stdout.strip().splitlines()[-1])
    del held
    assert parent > 1024 and child < parent - 512, (parent, child)


def test_step_times_set_the_first_step_apart() -> None:
    times = step_times([3.0, 1.0, 2.0, 1.5])
    assert times == {"first": 3.0, "median": 1.75, "mean_after_first": 1.5}
    assert step_times([2.0]) == {"first": 2.0, "median": 2.0, "mean_after_first": 2.0}
    assert step_times([]) is None
