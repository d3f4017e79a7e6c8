"""Reading pictures for the image task: class folders and path,label tables to rows, rows to pixels.

Every picture is decoded up front, before the model loads, and a bad one stops the run with its file
name. Grey, palette, RGBA (laid over white) and 16-bit pictures become RGB; any size is resized
(shorter side to the configured size, centre crop).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from deltatune.train import data as D

if TYPE_CHECKING:
    from deltatune.train.schema import ImageConfig, TrainConfig

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
#: A picture whose shorter side is below ``size / SMALL`` is upsampled a lot: said once per run.
SMALL = 4


def decode(path: Path, size: int) -> tuple[torch.Tensor, bool]:
    """A picture file -> (uint8 (3, size, size), whether it was far smaller than ``size``).

    Raises ``ValueError`` naming the file for anything Pillow cannot read completely."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise ValueError("task 'image' reads pictures with Pillow: pip install 'deltatune[vision]'") from None
    import numpy as np

    try:
        with Image.open(path) as img:
            img.load()  # decodes every byte: a truncated file fails here, not in the middle of training
            small = min(img.size) * SMALL < size
            rgb = _to_rgb(img, np)
    except UnidentifiedImageError:
        raise ValueError(f"{path} is not a picture Pillow can read (PNG, JPEG, ...); remove it or convert it") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"{path} is corrupt or truncated ({err}); remove it or re-export it") from None
    return resize(rgb, size), small


def _to_rgb(img: Any, np: Any) -> torch.Tensor:
    """Any Pillow mode -> uint8 (3, H, W): 16/32-bit scaled to 8-bit, alpha laid over white."""
    from PIL import Image

    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        if img.mode == "F":
            top = max(float(arr.max()), 1.0) if arr.max() > 1 else 1.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)         # (H, W, 3)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)         # (3, H, W)


def resize(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (C, H, W) -> uint8 (C, size, size): shorter side to ``size``, centre crop."""
    _, h, w = pixels.shape
    if (h, w) == (size, size):
        return pixels
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    x = F.interpolate(pixels[None].float(), size=(nh, nw), mode="bilinear", align_corners=False,
                      antialias=scale < 1)[0]
    top, left = (nh - size) // 2, (nw - size) // 2
    return x[:, top:top + size, left:left + size].round().clamp(0, 255).to(torch.uint8)


def folder_rows(root: Path) -> list[tuple[str, str]]:
    """(path, class) rows of an ImageFolder tree; every class folder must hold a picture."""
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"{root} has no class folders; put each class's pictures in a sub-folder named after it "
                         f"(e.g. {root / 'cat' / '1.png'}), or give a CSV/JSONL of path,label")
    rows = []
    for cls in classes:
        files = sorted(f for f in cls.rglob("*") if f.is_file() and not f.name.startswith("."))
        if not files:
            raise ValueError(f"class folder {cls} is empty; add its pictures or remove the folder "
                             "(a class without examples cannot be learnt)")
        rows += [(str(f), cls.name) for f in files]
    return rows


def table_rows(path: Path, image: ImageConfig, label_column: str) -> list[tuple[str, str]]:
    """(path, label) rows of a CSV/JSONL; relative paths are read from the table's folder."""
    rows = D.read_table(path, [image.path_column, label_column])
    out = []
    for file, label in rows:
        p = Path(file).expanduser()
        out.append((str(p if p.is_absolute() else path.parent / p), label))
    return out


def source_rows(source: str, config: TrainConfig) -> list[tuple[str, str]]:
    path = Path(source).expanduser()
    if path.is_dir():
        return folder_rows(path)
    if not path.exists():
        raise ValueError(f"data {source} not found; give a folder of class folders or a CSV/JSONL of path,label")
    return table_rows(path, config.data.image, config.data.label_column)


def decode_rows(rows: list[tuple[str, int]], size: int) -> tuple[list[tuple[torch.Tensor, int]], int]:
    """Decode every picture up front (errors name the file); returns the examples and how many were small."""
    missing = next((p for p, _ in rows if not Path(p).is_file()), None)
    if missing is not None:  # before decoding anything: a wrong path column fails at once
        raise ValueError(f"picture {missing} does not exist; fix the path (relative paths are read from the "
                         "table's folder)")
    out, small = [], 0
    for p, label in rows:
        pixels, is_small = decode(Path(p), size)
        out.append((pixels, label))
        small += is_small
    return out, small


__all__ = ["IMAGE_SUFFIXES", "decode", "decode_rows", "resize", "folder_rows", "source_rows", "table_rows"]
