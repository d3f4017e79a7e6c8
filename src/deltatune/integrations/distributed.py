"""Adapters on several processes with PyTorch's own engines: DDP and FSDP2 (``fully_shard``).

An adapted model is an ordinary ``nn.Module`` whose frozen base parameters have
``requires_grad=False``, so both engines work on it unchanged. What this module adds is the few
things that are easy to get wrong around them::

    dist.init_process_group(...)                    # torchrun or your launcher
    model = load_base_model()                        # the same weights on every rank
    dt.attach(model, config)                         # attach / load_adapter BEFORE wrapping
    ddp = wrap_ddp(model)                            # or: shard(model, blocks=(BertLayer,))
    ...train: each rank its own slice of the batch, the usual optimizer over the trainable params...
    save_on_rank0(ddp, "out/adapter")                # every rank calls it; rank 0 writes
    dt.load_adapter(fresh_model, "out/adapter")      # on every rank: the directory is complete

Rules, and why:

- **Attach, load and choose the trainable adapters before wrapping.** DDP fixes its set of
  trainable parameters (its gradient buckets) when it is built; ``fully_shard`` replaces every
  parameter with a shard. Attaching, detaching or ``set_active(..., trainable=True)`` afterwards
  is not seen (DDP) or breaks the module (FSDP). Merging is for an unsharded model: load the
  saved adapter onto a plain model and merge there.
- **Ranks start from rank 0's adapter.** Adapter initialisation is random. DDP broadcasts rank 0's
  parameters and buffers when it is built (the frozen base too, once); :func:`shard` broadcasts
  the adapter tensors before sharding. The base itself must be loaded identically on every rank.
- **Unused trainable parameters.** DDP expects a gradient for every trainable parameter each step,
  and otherwise fails on the *next* step ("Expected to have finished reduction in the prior
  iteration"). Frozen adapters are ignored, so several adapters with only one active are fine
  when ``set_active`` froze the others (its default). An adapter left trainable but not applied
  (inactive, merged, or on a routed layer) is a parameter with no gradient: :func:`wrap_ddp` turns
  on ``find_unused_parameters`` exactly then. An adapter on a module that the forward never
  reaches cannot be seen statically; pass ``find_unused_parameters=True`` for it.
- **Saving is one collective.** Every rank calls :func:`save_on_rank0` (under FSDP the tensors
  are gathered from all shards); rank 0 alone writes, atomically, so ranks never race on the
  directory; every rank returns only once the files are complete, and a failure on rank 0 is
  raised on every rank instead of leaving the others waiting. The directory must be visible to
  every rank that loads it (a shared filesystem, or copy it).

FSDP: ``fully_shard`` (FSDP2, ``torch.distributed.fsdp.fully_shard``) runs on CPU with the gloo
backend and accepts frozen and trainable parameters in one unit; only parameters that received a
gradient are reduced. The classic ``FullyShardedDataParallel`` wrapper (FSDP1) needs an
accelerator: on a CPU-only machine it raises ``RuntimeError: FSDP needs a non-CPU accelerator
device``, so it is not tested here and not handled by these helpers (they refuse it with a
message). If you use it anyway: pass ``use_orig_params=True`` (otherwise a flat parameter that
mixes frozen base weights and trainable adapter weights is rejected), put each transformer block
in its own unit (``auto_wrap_policy=ModuleWrapPolicy({BlockClass})``), and gather the adapter
with ``with FSDP.summon_full_params(model, writeback=False): ...`` before calling
``deltatune.save_adapter(model.module, ...)`` on rank 0.

Tested on CPU with gloo (``tests/integrations/test_distributed.py``): two ranks under DDP and under
``fully_shard`` end with the adapter a single process reaches on the whole batch, within 1e-6,
and with bit-identical base weights. The accelerator path (NCCL) is written for but untested here.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from deltatune.core.records import adapted_layers
from deltatune.core.stored import StoredAdapter, capture
from deltatune.formats import check_format, write

__all__ = [
    "gather_adapter_state",
    "is_main_process",
    "save_on_rank0",
    "shard",
    "sync_adapters",
    "unused_adapter_parameters",
    "unwrap",
    "wrap_ddp",
]


def _world() -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` when no process group is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """True on rank 0, and in a plain single-process run."""
    return _world()[0] == 0


def _require_group(what: str) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"{what} needs a process group: call torch.distributed.init_process_group() "
                         "first (torchrun sets the environment it reads)")


def _refuse_fsdp1(model: nn.Module) -> None:
    if "torch.distributed.fsdp" not in sys.modules:  # FSDP1 cannot be in use without it
        return
    from torch.distributed.fsdp import FullyShardedDataParallel

    if isinstance(model, FullyShardedDataParallel):
        raise ValueError("classic FullyShardedDataParallel is not handled here: use shard() "
                         "(torch.distributed.fsdp.fully_shard), or gather inside FSDP.summon_full_params(model, "
                         "writeback=False) and call deltatune.save_adapter(model.module, ...) on rank 0")


def _sharded(model: nn.Module) -> bool:
    if "torch.distributed.fsdp" not in sys.modules:
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def unwrap(model: nn.Module) -> nn.Module:
    """The adapted model inside DDP and ``torch.compile`` wrappers (in any nesting).

    ``fully_shard`` changes the model in place (its class, its parameters), so an FSDP2 model is
    returned as it is. The adapters' configs live on the adapted model, so library calls such as
    ``deltatune.parameter_report`` take ``unwrap(model)``.
    """
    from torch.nn.parallel import DistributedDataParallel

    while True:
        _refuse_fsdp1(model)
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif "torch._dynamo" in sys.modules and isinstance(model, sys.modules["torch._dynamo"].OptimizedModule):
            model = model._orig_mod
        else:
            return model


def unused_adapter_parameters(model: nn.Module) -> list[str]:
    """Names of trainable adapter parameters that the forward will not use.

    An adapter is skipped by its layer when it is not active there or merged into the base; on a
    layer with a per-example router any adapter may be skipped for a given batch.
    """
    unused: list[str] = []
    for layer_name, layer in adapted_layers(unwrap(model)):
        for name, adapter in layer.adapters.items():
            applied = name in layer.active and name not in layer.merged and layer.router is None
            if not applied:
                unused += [f"{layer_name}.{name}.{p}" for p, t in adapter.named_parameters() if t.requires_grad]
    return unused


def _trainable_or_fail(model: nn.Module, what: str) -> None:
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"{what}: the model has no trainable parameters; attach an adapter, or load one "
                         "with load_adapter(..., trainable=True), before wrapping")


def wrap_ddp(model: nn.Module, *, find_unused_parameters: bool | None = None,
             **ddp_kwargs: Any) -> nn.parallel.DistributedDataParallel:
    """Wrap an adapted model in ``DistributedDataParallel``; only trainable parameters are synchronised.

    DDP leaves ``requires_grad=False`` parameters (the frozen base) out of gradient
    synchronisation. ``find_unused_parameters=None`` decides from the adapters: on only when
    :func:`unused_adapter_parameters` finds any, since that mode walks the autograd graph every
    step. Other keyword arguments (``device_ids``...) go to DDP unchanged.
    """
    from torch.nn.parallel import DistributedDataParallel

    _require_group("wrap_ddp")
    if unwrap(model) is not model or _sharded(model):
        raise ValueError("the model is already wrapped (DDP, torch.compile or fully_shard); pass the adapted model "
                         "itself, and compile the DDP module afterwards if you want both")
    _trainable_or_fail(model, "wrap_ddp")
    if find_unused_parameters is None:
        find_unused_parameters = bool(unused_adapter_parameters(model))
    return DistributedDataParallel(model, find_unused_parameters=find_unused_parameters, **ddp_kwargs)


def _comm_device(t: Tensor) -> torch.device:
    """Where ``t`` can travel: gloo takes any tensor; NCCL and the like need one on the accelerator."""
    if dist.get_backend() == "gloo" or t.device.type != "cpu":
        return t.device
    accelerator = torch.accelerator.current_accelerator()
    if accelerator is None:
        raise ValueError(f"backend {dist.get_backend()!r} cannot send CPU tensors and no accelerator is present; "
                         "use the gloo backend on CPU")
    return torch.device(accelerator.type, torch.accelerator.current_device_index())


@torch.no_grad()
def sync_adapters(model: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s adapter tensors (parameters and buffers) and trainable parameters to every rank.

    A collective: every rank calls it, with the same adapters attached. DDP does this itself when
    it is built; :func:`shard` calls it before sharding.
    """
    _require_group("sync_adapters")
    model = unwrap(model)
    tensors: dict[int, Tensor] = {}  # by id, so a shared tensor travels once
    for _, layer in adapted_layers(model):
        for t in layer.adapters.state_dict(keep_vars=True).values():
            tensors.setdefault(id(t), t)
    for p in model.parameters():
        if p.requires_grad:
            tensors.setdefault(id(p), p)
    for t in tensors.values():  # same order on every rank: the module walk is deterministic
        buf = t.detach().to(_comm_device(t))
        dist.broadcast(buf, src)
        t.copy_(buf)


def shard(model: nn.Module, blocks: type[nn.Module] | Iterable[type[nn.Module]] = (),
          **fully_shard_kwargs: Any) -> nn.Module:
    """Shard an adapted model with FSDP2: each ``blocks`` module is one unit, the model the root unit.

    Put each transformer block in its own unit (e.g. ``blocks=(BertLayer,)``) so that only one
    block's base weights are gathered at a time; with no ``blocks`` the whole model is one unit.
    Frozen and trainable parameters may share a unit. Rank 0's adapter is broadcast first
    (:func:`sync_adapters`). Other keyword arguments (``mesh``, ``mp_policy``,
    ``reshard_after_forward``...) go to ``fully_shard`` unchanged. Returns ``model``, now sharded.
    """
    from torch.distributed.fsdp import fully_shard

    _require_group("shard")
    kinds = (blocks,) if isinstance(blocks, type) else tuple(blocks)
    if not all(isinstance(k, type) and issubclass(k, nn.Module) for k in kinds):
        raise ValueError(f"blocks must be nn.Module classes such as BertLayer, got {kinds!r}")
    if unwrap(model) is not model or _sharded(model):
        raise ValueError("the model is already wrapped or sharded; pass the adapted model itself")
    _trainable_or_fail(model, "shard")
    sync_adapters(model)
    # Children before parents: reversed pre-order puts every module after its descendants.
    for module in reversed(list(model.modules())):
        if module is not model and isinstance(module, kinds):
            fully_shard(module, **fully_shard_kwargs)
    fully_shard(model, **fully_shard_kwargs)
    return model


def gather_adapter_state(model: nn.Module, name: str = "default") -> dict[str, Tensor]:
    """Copies of adapter ``name``'s full tensors on CPU, keyed as in ``adapter_model.safetensors``.

    Under ``fully_shard`` the adapter's parameters are sharded (DTensors): this is a collective that
    gathers only the adapter's tensors, never the base, so every rank must call it. Under DDP or
    in a single process it only copies. Refuses an unknown or merged adapter on every rank alike.
    """
    return _gather(unwrap(model), name).tensors


def _full(t: Tensor) -> Tensor:
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        t = t.full_tensor()  # all-gather the shards where they live: (rows / world, ...) -> (rows, ...)
    # A copy, never a view of the live parameter that the next optimizer step changes.
    return t.detach().to("cpu", copy=True).contiguous()


def _gather(model: nn.Module, name: str) -> StoredAdapter:
    """``core.stored.capture`` with every tensor gathered; the same walk on every rank, so the
    all-gathers pair up in order."""
    return capture(model, name, tensor=_full)


def save_on_rank0(model: nn.Module, directory: str | os.PathLike[str], name: str = "default", *,
                  extra: dict[str, Any] | None = None, format: str = "deltatune") -> Path:
    """Save adapter ``name`` as ``deltatune.save_adapter`` does; every rank calls it, rank 0 writes.

    Bad input (unknown or merged adapter, unknown format, a method PEFT lacks) is refused on every
    rank before any communication. Rank 0 writes atomically; then rank 0's outcome is broadcast,
    so every rank returns once the directory is complete, or raises if rank 0 failed. Without a
    process group it is a plain save.
    """
    check_format(format, extra)
    adapted = unwrap(model)
    value = capture(adapted, name, tensor=lambda t: t)  # refuses an unknown or merged adapter; no communication
    if format == "peft":
        from deltatune.formats.peft_translate import entry_for

        entry_for(value.config.method)  # refuses a method with no PEFT form
    value = _gather(adapted, name)
    rank, world = _world()
    failure: Exception | None = None
    if rank == 0:
        try:
            write(value, directory, format, model=adapted, extra=extra)
        except Exception as e:
            if world == 1:
                raise
            failure = e
    if world > 1:
        outcome = [None if failure is None else f"{type(failure).__name__}: {failure}"]
        dist.broadcast_object_list(outcome, src=0)  # also the barrier: no rank returns before the write
        if failure is not None:
            raise failure
        if outcome[0] is not None:
            raise RuntimeError(f"rank 0 failed to save the adapter to {directory}: {outcome[0]}")
    return Path(directory)
