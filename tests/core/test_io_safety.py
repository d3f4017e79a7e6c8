"""Saving never deletes what deltatune did not write, survives ``kill -9`` mid-swap, cleans only its
own leftovers, and leaves ordinary permissions (the umask's)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import deltatune as dt
from deltatune.core import files as io
from deltatune.formats import convert
from tests.models import ZOO

BERT = ZOO["bert"]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2] / "src"),
                                                     str(Path(__file__).parents[2])])}


def _model():
    model = BERT.build()
    dt.attach(model, dt.LoraConfig(target=["query", "value"]))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1)
    return model


def _leftovers(root: Path) -> list[str]:
    return [p.name for p in root.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]


@pytest.mark.parametrize("fmt", ["deltatune", "peft"])
def test_save_into_a_directory_with_other_files_refuses_and_touches_nothing(tmp_path, fmt):
    target = tmp_path / "a"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=rf"{target} holds files deltatune did not write \(e.g. 'notes.txt'\)"):
        dt.save_adapter(_model(), target, format=fmt)
    assert [p.name for p in tmp_path.iterdir()] == ["a"] and [p.name for p in target.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("fmt", ["deltatune", "peft"])
def test_a_save_replaces_an_earlier_deltatune_save(tmp_path, fmt):
    model = _model()
    dt.save_adapter(model, tmp_path / "a", format=fmt)
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).add_(1.0)
    dt.save_adapter(model, tmp_path / "a", format=fmt)  # ours: replaced
    fresh = BERT.build()
    dt.load_adapter(fresh, tmp_path / "a")
    torch.testing.assert_close(BERT.run(fresh), BERT.run(model), rtol=0, atol=0)
    manifest = json.loads((tmp_path / "a" / io.MANIFEST).read_text())
    assert manifest["files"] == ["adapter_config.json", "adapter_model.safetensors"]
    assert _leftovers(tmp_path) == []


def test_a_save_from_before_the_manifest_is_still_replaced_but_a_peft_written_one_is_not(tmp_path):
    model = _model()
    dt.save_adapter(model, tmp_path / "old")
    (tmp_path / "old" / io.MANIFEST).unlink()  # as deltatune wrote it before manifests
    dt.save_adapter(model, tmp_path / "old")
    dt.save_adapter(model, tmp_path / "theirs", format="peft")
    (tmp_path / "theirs" / io.MANIFEST).unlink()
    (tmp_path / "theirs" / "README.md").write_text("model card")  # as PEFT itself writes it
    with pytest.raises(ValueError, match="e.g. 'README.md'"):
        dt.save_adapter(model, tmp_path / "theirs")
    with pytest.raises(ValueError, match="e.g. 'README.md'"):
        convert(tmp_path / "old", tmp_path / "theirs", to="peft")
    assert (tmp_path / "theirs" / "README.md").read_text() == "model card"


def test_a_file_where_the_directory_should_be_is_refused(tmp_path):
    (tmp_path / "a").write_text("not a directory")
    with pytest.raises(ValueError, match="is a file"):
        dt.save_adapter(_model(), tmp_path / "a")
    assert (tmp_path / "a").read_text() == "not a directory"


def test_convert_replaces_its_own_output_only(tmp_path):
    model = _model()
    dt.save_adapter(model, tmp_path / "ours")
    convert(tmp_path / "ours", tmp_path / "peft", to="peft")
    convert(tmp_path / "ours", tmp_path / "peft", to="peft")  # again: replaced
    convert(tmp_path / "peft", tmp_path / "back", to="deltatune")
    (tmp_path / "back" / "keep.bin").write_bytes(b"\0")
    with pytest.raises(ValueError, match="'keep.bin'"):
        convert(tmp_path / "peft", tmp_path / "back", to="deltatune")
    assert (tmp_path / "back" / "keep.bin").read_bytes() == b"\0"


_SAVE_TWICE = """
import sys, torch, deltatune as dt
from tests.models import ZOO
model = ZOO["bert"].build()
dt.attach(model, dt.LoraConfig(target=["query"]))
dt.save_adapter(model, sys.argv[1])
with torch.no_grad():
    next(p for p in model.parameters() if p.requires_grad).add_(1.0)
dt.save_adapter(model, sys.argv[1])
"""


def test_killed_between_the_two_renames_the_next_save_puts_the_old_one_back(tmp_path):
    target = tmp_path / "a"
    done = subprocess.run([sys.executable, "-c", _SAVE_TWICE, str(target)], capture_output=True, text=True,
                          env={**ENV, "DELTATUNE_TEST_CRASH_AT": "save-swap"}, timeout=300)
    assert done.returncode == -9, done.stderr[-2000:]
    assert not target.exists() and len(list(tmp_path.glob(".a.old-*"))) == 1  # the first save, moved aside
    (tmp_path / ".a.tmp-keep").mkdir()      # not deltatune's pattern: never touched
    (tmp_path / "b.tmp-1-0000beef").mkdir()  # nor this
    io.remove_leftovers(tmp_path)  # what the next save (or the next `deltatune train`) does first
    assert sorted(p.name for p in tmp_path.iterdir()) == [".a.tmp-keep", "a", "b.tmp-1-0000beef"]
    fresh = BERT.build()
    dt.load_adapter(fresh, target)
    model = BERT.build()
    dt.attach(model, dt.LoraConfig(target=["query"]))
    torch.testing.assert_close(BERT.run(fresh), BERT.run(model), rtol=0, atol=0)  # the first save: B = 0


def test_a_live_process_temporary_directory_is_left_alone(tmp_path):
    live = tmp_path / f".a.tmp-{os.getppid()}-0123abcd"  # our parent: alive
    live.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    gone = tmp_path / f".a.tmp-{int(dead.stdout)}-0123abcd"
    gone.mkdir()
    io.remove_leftovers(tmp_path)
    assert live.is_dir() and not gone.exists()


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_saved_files_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        dt.save_adapter(_model(), tmp_path / "a")
        dt.save_adapter(_model(), tmp_path / "p", format="peft")
    finally:
        os.umask(old)
    for d in (tmp_path / "a", tmp_path / "p"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o777 & ~umask
        for f in d.iterdir():
            assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f
