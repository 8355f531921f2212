"""Built-in demo dataset: small procedural scenes a CPU can learn in minutes.

Each image is a smooth "plain" background with a few overlapping shapes. A shape's class decides
its texture (horizontal or vertical stripes, checkerboard, dots, noise) or, for "disk", its form (a
flat round region); shape outlines, sizes and every colour are random and shared by all classes, so
one pixel's colour never tells its class. Scenes are written once, in the ADE20K layout (annotation
value = class + 1, 0 = ignore), and read back by :class:`~segkit.data.ade20k.ADE20KDataset`.
Same parameters, same bytes: everything derives from ``numpy.random.default_rng([seed, split, i])``.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from segkit.data.ade20k import ARCHIVE_DIR, ADE20KDataset
from segkit.data.base import SegmentationDataset, default_data_root
from segkit.errors import DataError

# No diagonal stripes: a checkerboard's strongest frequencies are diagonal too, which made the two
# classes hard to tell apart within the demo's few-minute training budget.
DEMO_CLASSES = ("plain", "horizontal stripes", "vertical stripes", "checkerboard", "dots", "noise", "disk")
DEMO_PALETTE = np.array([(0, 0, 0), (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48),
                         (145, 30, 180), (255, 225, 25)], dtype=np.uint8)
SPLITS = ("training", "validation")
FORMAT_VERSION = 1  # bump when the generator changes, so a stale cache is noticed
_DISK = DEMO_CLASSES.index("disk")

Pattern = Callable[[np.random.Generator, np.ndarray, np.ndarray], np.ndarray]


def _stripes(dy: float, dx: float) -> Pattern:
    def pattern(rng: np.random.Generator, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        period = rng.uniform(5.0, 9.0)
        return ((dy * y + dx * x) / period + rng.uniform()) % 1.0 < 0.5
    return pattern


def _checkerboard(rng: np.random.Generator, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    cell = rng.uniform(3.0, 5.0)
    oy, ox = rng.uniform(0, 2 * cell, size=2)
    return (np.floor((y + oy) / cell) + np.floor((x + ox) / cell)) % 2 == 1


def _dots(rng: np.random.Generator, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    spacing = rng.uniform(6.0, 8.0)
    oy, ox = rng.uniform(0, spacing, size=2)
    fy = (y + oy) % spacing - spacing / 2
    fx = (x + ox) % spacing - spacing / 2
    return fy**2 + fx**2 < (spacing * 0.28) ** 2


def _noise(rng: np.random.Generator, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    # 2x2-pixel grains: single-pixel noise is mostly averaged away by JPEG and downscaling.
    grains = rng.uniform(size=((y.shape[0] + 1) // 2, (y.shape[1] + 1) // 2))
    return grains.repeat(2, 0).repeat(2, 1)[: y.shape[0], : y.shape[1]]


def _flat(rng: np.random.Generator, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    return np.zeros(y.shape)


# Texture per class; index 0 (plain) is the background, drawn separately.
_PATTERNS: dict[int, Pattern] = {
    1: _stripes(1.0, 0.0),
    2: _stripes(0.0, 1.0),
    3: _checkerboard,
    4: _dots,
    5: _noise,
    _DISK: _flat,
}


def _contrasting(rng: np.random.Generator, brightness: float) -> np.ndarray:
    """A random colour whose mean brightness differs from ``brightness`` by more than 60."""
    while True:
        colour = rng.uniform(0, 255, size=3)
        if abs(colour.mean() - brightness) > 60:
            return colour


def _shape(rng: np.random.Generator, cls: int, y: np.ndarray, x: np.ndarray, size: int) -> np.ndarray:
    """Region of one object: a disk for the disk class, else an ellipse, rotated box or triangle."""
    cy, cx = rng.uniform(0.1 * size, 0.9 * size, size=2)
    if cls == _DISK:
        return (y - cy) ** 2 + (x - cx) ** 2 < (rng.uniform(0.15, 0.3) * size) ** 2
    kind = rng.integers(3)
    ry, rx = rng.uniform(0.15, 0.35, size=2) * size
    angle = rng.uniform(0, np.pi)
    v = (y - cy) * np.cos(angle) - (x - cx) * np.sin(angle)
    u = (y - cy) * np.sin(angle) + (x - cx) * np.cos(angle)
    if kind == 0:
        return (v / ry) ** 2 + (u / rx) ** 2 < 1
    if kind == 1:
        return (np.abs(v) < ry) & (np.abs(u) < rx)
    # Triangle: inside three half-planes whose normals are 120 degrees apart.
    r = max(ry, rx)
    normals = [(np.cos(angle + k * 2 * np.pi / 3), np.sin(angle + k * 2 * np.pi / 3)) for k in range(3)]
    return np.logical_and.reduce([(y - cy) * ny + (x - cx) * nx < r / 2 for ny, nx in normals])


def render_scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One ``size`` x ``size`` scene: RGB uint8 image and uint8 train-id mask."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    # Plain background: a gentle gradient between two random colours.
    a, b = rng.uniform(0, 255, size=(2, 3))
    angle = rng.uniform(0, 2 * np.pi)
    ramp = ((y * np.sin(angle) + x * np.cos(angle)) / (size * 1.5) + 0.5).clip(0, 1)[..., None]
    image = a * (1 - ramp) + b * ramp
    mask = np.zeros((size, size), dtype=np.uint8)
    # Disks go on top: an occluded disk would no longer be told by its shape.
    for cls in sorted(rng.integers(1, len(DEMO_CLASSES), size=rng.integers(2, 5)), key=lambda c: c == _DISK):
        cls = int(cls)
        region = _shape(rng, cls, y, x, size)
        # Texture colours contrast with each other; a flat disk's colour with what it covers.
        a = _contrasting(rng, image[region].mean()) if cls == _DISK else rng.uniform(0, 255, size=3)
        b = _contrasting(rng, a.mean())
        weight = _PATTERNS[cls](rng, y, x).astype(np.float64)[..., None]
        image = np.where(region[..., None], a * (1 - weight) + b * weight, image)
        mask[region] = cls
    image += rng.normal(0, 5, size=image.shape)  # sensor noise, so "plain" is not perfectly flat
    return image.round().clip(0, 255).astype(np.uint8), mask


def _write_split(base: Path, split: str, count: int, seed: int, size: int) -> None:
    image_dir, mask_dir = base / "images" / split, base / "annotations" / split
    image_dir.mkdir(parents=True)
    mask_dir.mkdir(parents=True)
    for i in range(count):
        image, mask = render_scene(np.random.default_rng([seed, SPLITS.index(split), i]), size)
        stem = f"DEMO_{'train' if split == 'training' else 'val'}_{i + 1:08d}"
        # 4:4:4 chroma keeps thin coloured stripes intact; ADE layout stores class + 1.
        Image.fromarray(image).save(image_dir / f"{stem}.jpg", quality=95, subsampling=0)
        Image.fromarray(mask + 1).save(mask_dir / f"{stem}.png")


def ensure_demo(root: Path, seed: int = 0, num_train: int = 400, num_val: int = 80,
                image_size: int = 64) -> Path:
    """Generate the demo dataset under ``root`` unless it is already there with these parameters.

    Generation happens in a temporary sibling directory renamed into place at the end, so an
    interrupted run never leaves a partial dataset behind.
    """
    params = {"format_version": FORMAT_VERSION, "seed": seed, "num_train": num_train,
              "num_val": num_val, "image_size": image_size, "classes": list(DEMO_CLASSES)}
    info = root / "demo.json"
    if root.exists():
        if not info.is_file():
            raise DataError(f"{root} exists but is not a segkit demo dataset (no demo.json); "
                            f"point dataset.root at another directory")
        found = json.loads(info.read_text())
        differ = ", ".join(f"{key}={found.get(key)!r} (wanted {value!r})"
                           for key, value in params.items() if found.get(key) != value)
        if differ:
            raise DataError(f"{root} holds a demo dataset generated with {differ}; delete it or "
                            f"point dataset.root elsewhere")
        return root
    if min(num_train, num_val) < 1 or image_size < 16:
        raise DataError(f"demo needs num_train, num_val >= 1 and image_size >= 16, got {params}")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        for split, count in zip(SPLITS, (num_train, num_val)):
            _write_split(tmp / ARCHIVE_DIR, split, count, seed, image_size)
        (tmp / "demo.json").write_text(json.dumps(params, indent=1) + "\n")
        try:
            os.rename(tmp, root)
        except OSError:
            if not info.is_file():  # not a concurrent generator that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


class DemoDataset(ADE20KDataset):
    """The demo scenes, generated on first use under ``root`` (default ``$SEGKIT_DATA/demo`` or
    ``./data/demo``); splits ``training`` and ``validation``."""

    display_name = "Demo"
    prepare_hint = "The demo dataset has the splits 'training' and 'validation'."

    def __init__(self, root: str | Path | None = None, split: str = "training", *, seed: int = 0,
                 num_train: int = 400, num_val: int = 80, image_size: int = 64,
                 **kwargs: Any) -> None:
        root = Path(root) if root is not None else default_data_root() / "demo"
        ensure_demo(root, seed, num_train, num_val, image_size)
        super().__init__(root, split, classes=DEMO_CLASSES, palette=DEMO_PALETTE, **kwargs)

    # No benchmark to submit to: predictions are written as train ids, not ADE's id + 1.
    encode_prediction = SegmentationDataset.encode_prediction
