"""Tiny labelled pictures for the image-task tests: three colour classes, PNG and JPEG mixed."""

from __future__ import annotations

import csv
from pathlib import Path

COLOURS = {"blue": (30, 30, 200), "green": (30, 200, 30), "red": (200, 30, 30)}


def picture(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (20, 24), seed: int = 0,
            mode: str = "RGB") -> Path:
    """A noisy picture of one colour (numpy's seeded noise), saved as ``path`` (PNG/JPEG by suffix)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    arr = np.clip(np.array(colour)[None, None, :] + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr)
    if mode != "RGB":
        img = img.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def image_folder(root: Path, per_class: int = 12) -> Path:
    """``root/<colour>/<i>.png|jpg``: the ImageFolder layout."""
    for c, (name, colour) in enumerate(COLOURS.items()):
        for i in range(per_class):
            picture(root / name / f"{i}.{'png' if i % 2 else 'jpg'}", colour, seed=100 * c + i)
    return root


def image_table(root: Path, per_class: int = 8, relative: bool = True) -> Path:
    """``root/images/...`` plus ``root/labels.csv`` with ``path,label`` rows."""
    rows = []
    for c, (name, colour) in enumerate(COLOURS.items()):
        for i in range(per_class):
            p = picture(root / "images" / f"{name}{i}.png", colour, seed=100 * c + i)
            rows.append((str(p.relative_to(root)) if relative else str(p), name))
    table = root / "labels.csv"
    with table.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label"])
        writer.writerows(rows)
    return table
