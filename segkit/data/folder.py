"""A user's own data: ``ROOT/images/<split>/`` and ``ROOT/masks/<split>/`` matched by relative path
stem, described by ``ROOT/classes.yaml`` (or ``classes.json``)::

    classes: [background, road, car]   # class i is mask value i
    ignore_index: 255                  # mask value(s) meaning "not labelled" (default 255)
    palette: [[0, 0, 0], [128, 64, 128], [0, 0, 142]]   # optional, one RGB colour per class

Masks are single-channel 8-bit PNG/BMP/TIFF files (lossy JPEG masks are refused). A split other
than the training and validation splits may have no ``masks/<split>`` folder at all: its images are
then unlabelled (inference only).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from segkit.data.base import (
    IMAGE_SUFFIXES,
    SegmentationDataset,
    bit_palette,
    index_files,
    make_lut,
    missing_split_error,
    pair_samples,
)
from segkit.errors import DataError

MASK_SUFFIXES = (".png", ".bmp", ".tif", ".tiff")
CLASS_FILES = ("classes.yaml", "classes.yml", "classes.json")
_LAYOUT = """  {root}/classes.yaml
  {root}/images/<split>/**/<name>.{{jpg,png,...}}
  {root}/masks/<split>/**/<name>.png"""


def read_class_file(root: Path) -> tuple[list[str], list[int], np.ndarray]:
    """Class names, raw mask values to ignore and palette from ``ROOT/classes.{yaml,json}``."""
    path = next((root / name for name in CLASS_FILES if (root / name).is_file()), None)
    if path is None:
        raise DataError(f"no class list in {root}: expected one of {', '.join(CLASS_FILES)} with "
                        f"'classes: [name, ...]' (layout:\n{_LAYOUT.format(root=root)})")
    try:
        text = path.read_text(encoding="utf-8")
        meta = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise DataError(f"{path}: cannot parse ({e})") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path}: expected a mapping with a 'classes' list, got {type(meta).__name__}")
    unknown = sorted(set(meta) - {"classes", "ignore_index", "palette"})
    if unknown:
        raise DataError(f"{path}: unknown key(s) {unknown}; expected classes, ignore_index, palette")

    classes = meta.get("classes")
    if (not isinstance(classes, list) or not 1 <= len(classes) <= 255
            or not all(isinstance(c, str) and c for c in classes) or len(set(classes)) != len(classes)):
        raise DataError(f"{path}: 'classes' must be a list of 1 to 255 distinct names, got {classes!r}")

    ignore = meta.get("ignore_index", 255)
    ignore = ignore if isinstance(ignore, list) else [ignore]
    if not all(isinstance(v, int) and len(classes) <= v <= 255 for v in ignore):
        raise DataError(f"{path}: 'ignore_index' must be mask value(s) in {len(classes)}..255 (not a "
                        f"class value), got {meta.get('ignore_index')!r}")

    palette = meta.get("palette")
    if palette is None:
        return classes, ignore, bit_palette(len(classes))
    array = np.asarray(palette, dtype=object)
    if (array.shape != (len(classes), 3)
            or not all(isinstance(v, int) and 0 <= v <= 255 for v in array.ravel())):
        raise DataError(f"{path}: 'palette' must hold {len(classes)} [R, G, B] colours with values "
                        f"0..255, one per class")
    return classes, ignore, array.astype(np.uint8)


class FolderDataset(SegmentationDataset):
    """Images and index masks in plain folders; see the module docstring for the layout."""

    def __init__(self, root: str | Path, split: str = "train", *, require_masks: bool = True,
                 **kwargs: Any) -> None:
        root = Path(root)
        image_dir, mask_dir = root / "images" / split, root / "masks" / split
        hint = "Put your data in this layout, or point dataset.root at it."
        if not image_dir.is_dir():
            raise missing_split_error("Folder dataset", root, split, image_dir,
                                      _LAYOUT.format(root=root), hint)
        classes, ignore, palette = read_class_file(root)
        images = index_files(image_dir, IMAGE_SUFFIXES)
        if mask_dir.is_dir():
            lossy = index_files(mask_dir, (".jpg", ".jpeg"))
            if lossy:
                raise DataError(f"JPEG masks in {mask_dir} ({', '.join(sorted(lossy)[:3])}): JPEG "
                                f"compression changes class values, save masks as PNG")
            masks = index_files(mask_dir, MASK_SUFFIXES)
        elif require_masks:
            raise missing_split_error("Folder dataset", root, split, mask_dir,
                                      _LAYOUT.format(root=root), hint)
        else:
            masks = None
        lut = make_lut({**{v: v for v in range(len(classes))}, **{v: 255 for v in ignore}})
        samples = pair_samples(images, masks, image_dir, mask_dir if masks is not None else None)
        super().__init__(root, split, samples, classes, palette, lut, **kwargs)
