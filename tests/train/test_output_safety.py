"""The run directory is never lost: refusals before anything is written, one writer at a time
(real processes), ``kill -9`` at named points then ``--resume`` ends bit-identical, no leftovers,
and the umask's permissions. Also merge / combine / convert outputs."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deltatune.train import load_config, run_training
from deltatune.train.checkpoint import latest_checkpoint

ROOT = Path(__file__).parents[2]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]), "OMP_NUM_THREADS": "1",
       "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def settings(model: Path, data: Path) -> list[str]:
    # 48 training texts / 8 = 6 steps an epoch, 12 in all; checkpoints at 2, 4, 6 (epoch end), 8, 10, 12.
    return [f"model={model}", "task=classification", f"data.path={data}", "epochs=2", "batch_size=8",
            "lr=1e-2", "checkpoint_every=2", "adapter.dropout=0.1", "threads=1", "precision=fp32"]


def train_in_process(model: Path, data: Path, out: Path, **kwargs) -> dict:
    return run_training(load_config(None, [*settings(model, data), f"output={out}"]), progress=False, **kwargs)


def cli(model: Path, data: Path, out: Path, *flags: str, crash: str | None = None,
        wait: bool = True) -> subprocess.CompletedProcess | subprocess.Popen:
    command = [sys.executable, "-m", "deltatune", "train", "--no-progress", "--output", str(out), *flags,
               *(a for s in settings(model, data) for a in ("--set", s))]
    env = {**ENV, **({"DELTATUNE_TEST_CRASH_AT": crash} if crash else {})}
    if not wait:
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / "adapter_model.safetensors")


def leftovers(run: Path) -> list[str]:
    return [str(p.relative_to(run)) for p in run.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]


@pytest.fixture(scope="module")
def reference(tiny_bert: Path, tiny_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("reference") / "run"
    metrics = train_in_process(tiny_bert, tiny_csv, out)
    return {"metrics": metrics, "adapter": adapter(out)}


def assert_same(run: Path, reference: dict) -> None:
    got = adapter(run)
    assert got.keys() == reference["adapter"].keys()
    assert all(torch.equal(got[k], reference["adapter"][k]) for k in got)
    assert json.loads((run / "metrics.json").read_text())["validation"] == reference["metrics"]["validation"]


# --- refusals ------------------------------------------------------------------------------------------


def test_a_finished_run_is_refused_without_resume_or_overwrite(tiny_bert, tiny_csv, tmp_path, reference):
    run = tmp_path / "run"
    train_in_process(tiny_bert, tiny_csv, run)
    (run / "notes.txt").write_text("my notes")  # not deltatune's: survives --overwrite
    before = adapter(run)
    done = cli(tiny_bert, tiny_csv, run)
    assert done.returncode == 2
    assert f"{run} holds a finished deltatune run; continue it with --resume, or replace it with --overwrite" \
        in " ".join(done.stderr.split())
    assert all(torch.equal(before[k], v) for k, v in adapter(run).items())
    with pytest.raises(ValueError, match="pass one"):
        train_in_process(tiny_bert, tiny_csv, run, resume=True, overwrite=True)

    (run / "checkpoint" / "mine.txt").write_text("also mine")
    train_in_process(tiny_bert, tiny_csv, run, overwrite=True)
    assert (run / "notes.txt").read_text() == "my notes" and (run / "checkpoint" / "mine.txt").is_file()
    assert_same(run, reference)
    assert leftovers(run) == []


def test_a_directory_deltatune_did_not_write_is_refused_even_with_overwrite(tiny_bert, tiny_csv, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("my own config\n")
    for flags in ((), ("--overwrite",)):
        done = cli(tiny_bert, tiny_csv, mine, *flags)
        assert done.returncode == 2
        assert "is not empty and deltatune did not write it (it holds 'config.yaml')" in " ".join(done.stderr.split())
    assert [p.name for p in mine.iterdir()] == ["config.yaml"]  # not even a lock file
    with pytest.raises(ValueError, match="holds no checkpoint"):
        train_in_process(tiny_bert, tiny_csv, tmp_path / "new", resume=True)
    assert not (tmp_path / "new").exists()
    assert (mine / "config.yaml").read_text() == "my own config\n"


def test_foreign_files_inside_the_adapter_folder_are_refused_at_the_start(tiny_bert, tiny_csv, tmp_path):
    run = tmp_path / "run"
    train_in_process(tiny_bert, tiny_csv, run)
    (run / "adapter" / "extra.txt").write_text("x")
    with pytest.raises(ValueError, match=r"adapter holds files deltatune did not write \(e.g. 'extra.txt'\)"):
        train_in_process(tiny_bert, tiny_csv, run, overwrite=True)
    assert (run / "adapter" / "extra.txt").is_file() and (run / "adapter" / "adapter_model.safetensors").is_file()


# --- one writer at a time ----------------------------------------------------------------------------


def _wait_stopped(job: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert job.poll() is None, job.communicate()[1][-2000:]
        if Path(f"/proc/{job.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T":
            return
        time.sleep(0.1)
    raise AssertionError("the first run never reached its pause point")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_a_second_run_stops_at_once_naming_the_first_and_kill_9_leaves_no_lock(tiny_bert, tiny_csv, tmp_path,
                                                                                 reference):
    run = tmp_path / "run"
    # The first run pauses (SIGSTOP) holding the lock, just after its second checkpoint is in place.
    first = cli(tiny_bert, tiny_csv, run, crash="checkpoint-swap@2:STOP", wait=False)
    try:
        _wait_stopped(first)
        for flags in ((), ("--resume",), ("--overwrite",)):
            second = cli(tiny_bert, tiny_csv, run, *flags)
            message = " ".join(second.stderr.split())
            assert second.returncode == 2, message
            assert f"{run} is being written by another deltatune run (PID {first.pid} on {os.uname().nodename}, " \
                   "started 20" in message
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # The kernel dropped the lock with the process: the run continues from its checkpoint.
    done = cli(tiny_bert, tiny_csv, run, "--resume")
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resumed from {run / 'checkpoint'} at step 4 of 12" in done.stdout
    assert_same(run, reference)
    assert leftovers(run) == []
    holder = json.loads((run / ".deltatune.lock").read_text())  # the last run's, kept as the run's mark
    assert holder["host"] == os.uname().nodename and holder["pid"] != first.pid


# --- kill -9 at any point, then --resume -----------------------------------------------------------------

# (crash point, the step the run resumes from): killed while writing the 4th checkpoint (step 8), after
# it is durable but not yet published, after it is published but before step 6's is removed.
CRASHES = [("checkpoint-write@4", 6), ("checkpoint-publish@4", 6), ("checkpoint-swap@4", 8)]


@pytest.mark.parametrize(("point", "resumes_at"), CRASHES)
def test_kill_9_at_a_checkpoint_then_resume_ends_bit_identical(point, resumes_at, tiny_bert, tiny_csv, tmp_path,
                                                                reference):
    run = tmp_path / "run"
    done = cli(tiny_bert, tiny_csv, run, crash=point)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert not (run / "adapter").exists()
    assert latest_checkpoint(run / "checkpoint").name == f"step-{resumes_at:09d}"
    metrics = train_in_process(tiny_bert, tiny_csv, run, resume=True)
    assert metrics["resumed"] is True
    assert_same(run, reference)
    assert leftovers(run) == []
    assert [p.name for p in (run / "checkpoint").iterdir()] == ["step-000000012"]


def test_kill_9_while_replacing_the_adapter_then_resume(tiny_bert, tiny_csv, tmp_path, reference):
    run = tmp_path / "run"
    train_in_process(tiny_bert, tiny_csv, run)
    # Resuming a finished run scores it again and saves the adapter over the old one: killed mid-swap.
    done = cli(tiny_bert, tiny_csv, run, "--resume", crash="save-swap")
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert not (run / "adapter").exists() and len(list(run.glob(".adapter.old-*"))) == 1
    train_in_process(tiny_bert, tiny_csv, run, resume=True)
    assert_same(run, reference)
    assert leftovers(run) == []


# --- permissions ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_the_run_directory_follows_the_umask(umask, tiny_bert, tiny_csv, tmp_path):
    old = os.umask(umask)
    try:
        run = tmp_path / "run"
        cfg = load_config(None, [*settings(tiny_bert, tiny_csv), f"output={run}", "epochs=1"])
        run_training(cfg, progress=False)
    finally:
        os.umask(old)
    paths = [run, *run.rglob("*")]
    assert any(p.parent.name == "checkpoint" for p in paths) and (run / ".deltatune.lock") in paths
    for p in paths:
        want = (0o777 if p.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(p.stat().st_mode) == want, (p, oct(stat.S_IMODE(p.stat().st_mode)))


# --- merge, combine, convert -------------------------------------------------------------------------------


def _deltatune(*args: object):
    from typer.testing import CliRunner

    from deltatune.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_merge_combine_convert_keep_other_files_and_their_inputs(tiny_bert, tiny_csv, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    train_in_process(tiny_bert, tiny_csv, a)
    train_in_process(tiny_bert, tiny_csv, b)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("keep")

    refusals = [
        (("merge", a, "--output", foreign), f"{foreign} holds files deltatune did not write (e.g. 'keep.txt')"),
        (("merge", a, "--output", a / "adapter"), "overlaps the input"),
        (("combine", a, b, "--how", "cat", "--output", foreign), "(e.g. 'keep.txt')"),
        (("combine", a, b, "--how", "cat", "--output", a), "overlaps the input"),
        (("combine", a, b, "--how", "cat", "--output", a / "adapter" / "x"), "overlaps the input"),
        (("combine", a / "adapter", b, "--how", "cat", "--output", tmp_path), "overlaps the input"),
        (("convert", a / "adapter", foreign, "--to", "peft"), "(e.g. 'keep.txt')"),
        (("convert", a / "adapter", a / "adapter", "--to", "peft"), "overlaps the input"),
    ]
    for args, message in refusals:
        done = _deltatune(*args)
        assert done.exit_code == 2 and message in " ".join(done.output.split()), (args, done.output[-2000:])
    assert [p.name for p in foreign.iterdir()] == ["keep.txt"]

    for _ in range(2):  # the second time each replaces its own earlier output
        assert _deltatune("merge", a, "--output", tmp_path / "merged").exit_code == 0
        both = _deltatune("combine", a, b, "--how", "cat", "--heads-from", "1", "--output", tmp_path / "both")
        assert both.exit_code == 0, both.output[-2000:]
        assert _deltatune("convert", a / "adapter", tmp_path / "peft", "--to", "peft").exit_code == 0
    assert (tmp_path / "merged" / "config.json").is_file() and (tmp_path / "both" / "adapter_config.json").is_file()
    assert leftovers(tmp_path) == []
