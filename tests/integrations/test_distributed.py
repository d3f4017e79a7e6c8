"""Adapters under DDP and FSDP2 on two CPU processes (gloo), against a single-process run.

One start of two processes serves every multi-process test (starting them is the slow part): each rank
trains on its half of a fixed batch, under DDP and then under ``fully_shard``, saves through
``save_on_rank0`` and loads the result onto a fresh model; it writes what it saw to
``rank<r>-<mode>.safetensors``. The test compares those files with each other and with one
process trained on the whole batch. Ranks seed differently before attaching, so only rank 0's
initial adapter may survive: the runs agree only if it was broadcast.

The helpers' input checks run in this process, in a one-rank gloo group.
"""

from __future__ import annotations

import datetime
import json
import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch import nn

import deltatune as dt
from deltatune.integrations.distributed import (
    gather_adapter_state,
    is_main_process,
    save_on_rank0,
    shard,
    unused_adapter_parameters,
    unwrap,
    wrap_ddp,
)
from tests.models import ZOO

BERT, MLP = ZOO["bert"], ZOO["mlp"]
WORLD, STEPS, LR, SEED = 2, 3, 0.5, 100
MODES = ("ddp", "fsdp")


def _batch() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 100, (4, 10), generator=g)  # (B=4, T=10): 2 rows per rank
    mask = torch.ones_like(ids)
    mask[3, 6:] = 0  # one padded row
    return {"input_ids": ids, "attention_mask": mask}, torch.tensor([0, 2, 1, 2])


def _adapted(seed: int) -> nn.Module:
    """BERT with adapter 'a' trained (LoRA + the head in full) and adapter 'b' trainable but inactive."""
    model = BERT.build()
    torch.manual_seed(seed)
    dt.attach(model, dt.LoraConfig(target=["query", "value"], rank=4, modules_to_save=["classifier"]), "a")
    dt.attach(model, dt.LoraConfig(target=["key"], rank=2), "b", activate=False)
    dt.set_active(model, "a")
    dt.mark_trainable(model, ["a", "b"])  # 'b' gets no gradient: DDP must be told (find_unused_parameters)
    return model


def _train(wrapped: nn.Module, rows: slice) -> None:
    """SGD on ``rows`` of the batch; the loss is the mean over those rows (DDP averages over ranks)."""
    inputs, labels = _batch()
    opt = torch.optim.SGD([p for p in wrapped.parameters() if p.requires_grad], lr=LR)
    wrapped.train()
    for _ in range(STEPS):
        out = wrapped(**{k: v[rows] for k, v in inputs.items()}, labels=labels[rows])
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    wrapped.eval()


def _frozen(model: nn.Module) -> dict[str, torch.Tensor]:
    """The frozen (base) parameters, gathered whole under FSDP (a collective there)."""
    out = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            out[n] = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
    return out


def _run_mode(mode: str, rank: int, out: Path) -> None:
    from transformers.models.bert.modeling_bert import BertLayer

    model = _adapted(SEED + rank)
    wrapped = wrap_ddp(model) if mode == "ddp" else shard(model, blocks=BertLayer)
    _train(wrapped, slice(2 * rank, 2 * rank + 2))
    inputs, _ = _batch()
    with torch.no_grad():
        trained = BERT.run(wrapped, inputs)  # (4, 3) logits of the whole batch
    adapters = _adapters(wrapped)  # a collective under FSDP
    base = {f"base/{k}": v for k, v in _frozen(model).items()}
    save_on_rank0(wrapped, out / f"{mode}-adapter", "a")
    fresh = BERT.build()  # every rank loads what rank 0 wrote; save_on_rank0 returned only once it was complete
    dt.load_adapter(fresh, out / f"{mode}-adapter")
    with torch.no_grad():
        loaded = BERT.run(fresh, inputs)
    flags = {"find_unused": torch.tensor([float(getattr(wrapped, "find_unused_parameters", -1))]),
             "main": torch.tensor([float(is_main_process())])}
    save_file({**adapters, **base, "trained": trained, "loaded": loaded, **flags},
              str(out / f"rank{rank}-{mode}.safetensors"))


def _save_into_a_file(rank: int, out: Path) -> None:
    """Rank 0 cannot write (the parent is a file): every rank must raise, none may wait forever."""
    model = MLP.build()
    dt.attach(model, dt.LoraConfig(target=["fc1"], rank=2))
    (out / "blocker").touch()
    try:
        save_on_rank0(model, out / "blocker" / "adapter")
        outcome = "returned"
    except Exception as e:
        outcome = f"{type(e).__name__}: {e}"
    (out / f"rank{rank}-failure.txt").write_text(outcome)


def _worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # 127.0.0.1 only
    timeout = datetime.timedelta(seconds=60)
    store = dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=timeout)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout)
    try:
        for mode in MODES:
            _run_mode(mode, rank, Path(out))
        _save_into_a_file(rank, Path(out))
    finally:
        dist.destroy_process_group()


def _launch(out: Path) -> None:
    """Run ``_worker`` on WORLD processes and wait (at most 240 s) for them to finish."""
    # This process holds the rendezvous store on a port the OS picks: no race for a free port.
    store = dist.TCPStore("127.0.0.1", 0, WORLD, is_master=True, wait_for_workers=False)
    # A fork server imports torch, transformers and this module once; both ranks fork from it
    # (a fresh, single-threaded process, so forking is safe), which halves the start-up time.
    mp.get_context("forkserver").set_forkserver_preload([__name__, "transformers.models.bert.modeling_bert"])
    ctx = mp.start_processes(_worker, args=(WORLD, store.port, str(out)), nprocs=WORLD, join=False,
                             start_method="forkserver")
    deadline = time.monotonic() + 240
    try:
        while not ctx.join(timeout=5):  # raises with the rank's traceback if one fails
            if time.monotonic() > deadline:
                pytest.fail("the distributed workers did not finish in 240 s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()


def _adapters(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{n}/{k}": v for n in ("a", "b") for k, v in gather_adapter_state(model, n).items()}


def _reference() -> dict[str, torch.Tensor]:
    """One process, the whole batch, rank 0's seed; ``init/`` holds the adapters before training."""
    model = _adapted(SEED)
    initial = {f"init/{k}": v for k, v in _adapters(model).items()}
    base = {f"base/{k}": v for k, v in _frozen(model).items()}
    _train(model, slice(0, 4))
    with torch.no_grad():
        logits = BERT.run(model, _batch()[0])
    return {**_adapters(model), **initial, **base, "trained": logits}


def _check_ranks_agree(mode: str, ranks: list[dict[str, torch.Tensor]]) -> None:
    r0, r1 = ranks
    assert r0.keys() == r1.keys()
    for key in r0:
        if key not in ("loaded", "main"):  # "loaded": each rank's own model
            assert torch.equal(r0[key], r1[key]), f"{mode}: {key} differs between ranks"


def _check_equals_one_process(mode: str, got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    keys = sorted(k for k in ref if k.startswith(("a/", "b/")))
    assert keys == sorted(k for k in got if k.startswith(("a/", "b/")))
    for key in keys:
        torch.testing.assert_close(got[key], ref[key], rtol=0, atol=1e-6, msg=f"{mode}: {key}")
    moved = [k for k in keys if not torch.equal(ref[k], ref[f"init/{k}"])]
    assert len(moved) >= 6, moved  # 'a' trained: A and B of query and value, the head's weight and bias
    for key in keys:
        if key.startswith("b/"):  # inactive: no gradient, so it kept rank 0's initial values
            assert torch.equal(got[key], ref[f"init/{key}"]), f"{mode}: {key}"
    torch.testing.assert_close(got["trained"], ref["trained"], rtol=0, atol=1e-6)


def _check_base_unchanged(mode: str, got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    base = {k for k in got if k.startswith("base/")}
    assert base and base == {k for k in ref if k.startswith("base/")}
    for key in base:
        assert torch.equal(got[key], ref[key]), f"{mode}: {key} changed"


def _check_saved(mode: str, out: Path, ranks: list[dict[str, torch.Tensor]], ref: dict[str, torch.Tensor]) -> None:
    for got in ranks:  # every rank loaded rank 0's files and reproduced its own model
        torch.testing.assert_close(got["loaded"], got["trained"], rtol=0, atol=1e-6)
    saved = load_file(out / f"{mode}-adapter" / "adapter_model.safetensors")
    assert saved.keys() == {k[2:] for k in ref if k.startswith("a/")}
    fresh = BERT.build()
    dt.load_adapter(fresh, out / f"{mode}-adapter")
    with torch.no_grad():
        torch.testing.assert_close(BERT.run(fresh, _batch()[0]), ref["trained"], rtol=0, atol=1e-6)


def test_two_ranks_under_ddp_and_fsdp_match_one_process(tmp_path):
    # One test, so that pytest-xdist starts the processes once.
    _launch(tmp_path)
    ref = _reference()
    for mode in MODES:
        ranks = [load_file(tmp_path / f"rank{r}-{mode}.safetensors") for r in range(WORLD)]
        _check_ranks_agree(mode, ranks)
        _check_equals_one_process(mode, ranks[0], ref)
        _check_base_unchanged(mode, ranks[0], ref)
        _check_saved(mode, tmp_path, ranks, ref)
    assert [r["main"].item() for r in ranks] == [1.0, 0.0]
    # 'b' is trainable but inactive: wrap_ddp turned on unused-parameter detection for it.
    assert load_file(tmp_path / "rank0-ddp.safetensors")["find_unused"].item() == 1.0
    # One complete directory per save: no temporary leftovers from concurrent writers.
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("rank")) == [
        "blocker", "ddp-adapter", "fsdp-adapter"]
    # A failed write on rank 0 is raised on every rank.
    assert (tmp_path / "rank0-failure.txt").read_text().startswith(("NotADirectoryError", "FileExistsError"))
    assert (tmp_path / "rank1-failure.txt").read_text().startswith("RuntimeError: rank 0 failed to save")


# --- in this process: a one-rank group ------------------------------------------------------------


@pytest.fixture
def group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _mlp(b_trainable: bool) -> nn.Module:
    model = MLP.build()
    dt.attach(model, dt.LoraConfig(target=["fc1", "fc2"], rank=4), "a")
    dt.attach(model, dt.LoraConfig(target=["fc1"], rank=4), "b", activate=False)
    dt.set_active(model, "a")
    if b_trainable:
        dt.mark_trainable(model, ["a", "b"])
    return model


def _two_steps(wrapped: nn.Module) -> None:
    for _ in range(2):
        wrapped(MLP.inputs()).sum().backward()


def test_find_unused_parameters_is_on_exactly_when_an_adapter_is_trainable_but_skipped(group):
    frozen_b = _mlp(b_trainable=False)
    assert unused_adapter_parameters(frozen_b) == []
    ddp = wrap_ddp(frozen_b)
    assert ddp.find_unused_parameters is False
    _two_steps(ddp)

    trainable_b = _mlp(b_trainable=True)
    assert unused_adapter_parameters(trainable_b) == ["fc1.b.A", "fc1.b.B"]
    ddp = wrap_ddp(trainable_b)
    assert ddp.find_unused_parameters is True
    _two_steps(ddp)
    # Why it matters: without it DDP fails on the step after the one that skipped 'b'.
    with pytest.raises(RuntimeError, match="finished reduction"):
        _two_steps(wrap_ddp(_mlp(b_trainable=True), find_unused_parameters=False))


def test_merged_adapter_counts_as_unused():
    model = _mlp(b_trainable=False)
    dt.merge(model)
    dt.mark_trainable(model, ["a"])
    assert unused_adapter_parameters(model) == ["fc1.a.A", "fc1.a.B", "fc2.a.A", "fc2.a.B"]


def test_helpers_refuse_bad_input():
    with pytest.raises(ValueError, match="init_process_group"):
        wrap_ddp(_mlp(False))
    with pytest.raises(ValueError, match="init_process_group"):
        shard(_mlp(False))
    with pytest.raises(ValueError, match="format must be"):
        save_on_rank0(_mlp(False), "unused", "a", format="pickle")


def test_wrap_refuses_wrapped_or_frozen_models(group):
    model = _mlp(False)
    ddp = wrap_ddp(model)
    with pytest.raises(ValueError, match="already wrapped"):
        wrap_ddp(ddp)
    with pytest.raises(ValueError, match="already wrapped"):
        shard(ddp)
    frozen = MLP.build().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        wrap_ddp(frozen)
    with pytest.raises(ValueError, match="blocks must be nn.Module classes"):
        shard(_mlp(False), blocks=["Linear"])


def test_unwrap_sees_through_ddp_and_compile(group):
    model = _mlp(False)
    assert unwrap(model) is model
    assert unwrap(wrap_ddp(model)) is model
    other = _mlp(False)
    assert unwrap(torch.compile(wrap_ddp(other))) is other
    assert is_main_process()


def test_save_on_rank0_in_one_process_writes_what_save_adapter_writes(tmp_path):
    model = _mlp(False)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    save_on_rank0(model, tmp_path / "ours", "a", extra={"note": 1})
    dt.save_adapter(model, tmp_path / "core", "a", extra={"note": 1})
    ours, core = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "core"))
    assert ours.keys() == core.keys() and all(torch.equal(ours[k], core[k]) for k in ours)
    read = [json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("ours", "core")]
    assert read[0] == read[1]
    with pytest.raises(ValueError, match="no adapter named 'c'"):
        save_on_rank0(model, tmp_path / "c", "c")
    assert not (tmp_path / "c").exists()
    save_on_rank0(model, tmp_path / "peft", "a", format="peft")
    assert "peft_type" in json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
