"""Tests that run on every device this machine has: always on the CPU, and on CUDA too where a
GPU is present (``bench/gpu.sh`` runs this folder on the borrowed GPU machine).

The ``device`` fixture is parametrized over the devices that exist here rather than over a fixed
list with skips, so CI (no GPU) runs the CPU half and reports no skipped tests, and the same
assertions run unchanged on CUDA.
"""

import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)
