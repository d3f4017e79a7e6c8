"""Training on several processes: ``torchrun --nproc_per_node N -m deltatune train ...``.

torchrun starts N copies of the same command and tells each its ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``. ``deltatune train`` then joins one process group (gloo on CPU, NCCL on CUDA, one
GPU per process), and:

- every rank loads the same data split and the same base model; rank 0 goes first where a load
  writes a cache (the SmolLM2 conversion), the others follow once it is there;
- the adapter starts identical on every rank (same seed; DDP also broadcasts rank 0's copy), and
  is wrapped in ``DistributedDataParallel`` (``integrations.distributed.wrap_ddp``);
- each global batch of ``batch_size`` examples is split across ranks, so the step, the learning
  rate schedule and the result match one process on the same batches (the gradients are averaged,
  each rank's loss weighted by its share of the batch);
- dropout differs per rank and is reseeded from (seed, step, rank) every step, so a resumed run
  continues exactly without saving every rank's RNG state;
- rank 0 alone validates, writes checkpoints, the adapter and the metrics; the other ranks wait
  at a barrier, so the output directory must be one every rank can read (for ``--resume``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    """Where this process stands: rank ``rank`` of ``world``; ``world == 1`` is a plain run."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this run started the process group, so it also ends it

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def mean(self, value: float) -> float:
        """The mean of ``value`` over ranks (``value`` itself on one process)."""
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=_comm_device())
        dist.all_reduce(t)
        return float(t.item()) / self.world

    def share(self, indices: list[int]) -> list[int]:
        """This rank's slice of a global batch. A batch smaller than the world (the last of an
        epoch, at most) is padded with its own first examples, so no rank is left without work."""
        if not self.distributed:
            return indices
        padded = [indices[i % len(indices)] for i in range(max(len(indices), self.world))]
        return padded[self.rank::self.world]

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (it may write a cache); the others run it once it is done."""
        if not self.main:
            self.barrier()
        yield
        if self.main:
            self.barrier()


def _comm_device() -> torch.device:
    backend = dist.get_backend()
    if backend == "gloo":
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def env_world() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"WORLD_SIZE must be an integer, got {os.environ['WORLD_SIZE']!r}") from None


def start(device: str) -> Ranks:
    """Join the process group torchrun describes (if any); ``device`` is the config's device."""
    world = env_world()
    if world <= 1:
        return Ranks()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(local)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return Ranks(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local, owns_group=owns)


def finish(ranks: Ranks) -> None:
    if ranks.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def step_seed(seed: int, step: int, rank: int) -> int:
    """The RNG seed of one rank's step: distinct per (seed, step, rank), reproducible on resume."""
    return (seed * 1_000_003 + step) * 4099 + rank
