"""A user's own data: ``ROOT/images/<split>/`` and ``ROOT/masks/<split>/`` matched by relative path
stem, described by ``ROOT/classes.yaml`` (or ``classes.json``)::

    classes: [background, road, car]   # class i is mask value i
    ignore_index: 255                  # mask value(s) meaning "not labelled" (default 255)
    palette: [[0, 0, 0], [128, 64, 128], [0, 0, 142]]   # optional, one RGB colour per class
    ignore_color: [255, 255, 255]      # optional: colour(s) meaning "not labelled" in colour masks

Masks are single-channel 8-bit PNG/BMP/TIFF files of class indices (lossy JPEG masks are refused).
With ``mask_format="rgb"`` they are colour images instead, each pixel's colour one of ``palette``
(that class) or of ``ignore_color`` (ignore); ``"auto"`` reads L/P images as indices and RGB/RGBA
images as colours, file by file. Colour masks need an explicit ``palette`` whose colours are
distinct; ``python -m segkit.data.prepare folder --root ROOT --to-index`` converts a colour tree to
index PNGs once (``ROOT/masks_index``, used with ``mask_dir="masks_index"``).

A split other than the training and validation splits may have no ``masks/<split>`` folder at all:
its images are then unlabelled (inference only).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import yaml

from segkit.data.base import (
    IMAGE_SUFFIXES,
    MASK_FORMATS,
    ColorLut,
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
_CLASS_KEYS = ("classes", "ignore_index", "palette", "ignore_color")
_LAYOUT = """  {root}/classes.yaml
  {root}/images/<split>/**/<name>.{{jpg,png,...}}
  {root}/{masks}/<split>/**/<name>.png"""


class ClassFile(NamedTuple):
    path: Path
    classes: list[str]
    ignore: list[int]  # raw index-mask values meaning ignore
    palette: np.ndarray  # the file's palette, or bit_palette() when it gives none
    palette_given: bool
    ignore_colors: np.ndarray  # (K, 3) uint8 colours meaning ignore in colour masks


def _is_color(value: Any) -> bool:
    return (isinstance(value, list) and len(value) == 3
            and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in value))


def load_class_file(root: Path) -> ClassFile:
    """Everything ``ROOT/classes.{yaml,json}`` says (see the module docstring)."""
    path = next((root / name for name in CLASS_FILES if (root / name).is_file()), None)
    if path is None:
        raise DataError(f"no class list in {root}: expected one of {', '.join(CLASS_FILES)} with "
                        f"'classes: [name, ...]' (layout:\n{_LAYOUT.format(root=root, masks='masks')})")
    try:
        text = path.read_text(encoding="utf-8")
        meta = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise DataError(f"{path}: cannot parse ({e})") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path}: expected a mapping with a 'classes' list, got {type(meta).__name__}")
    unknown = sorted(set(meta) - set(_CLASS_KEYS))
    if unknown:
        raise DataError(f"{path}: unknown key(s) {unknown}; expected {', '.join(_CLASS_KEYS)}")

    classes = meta.get("classes")
    if (not isinstance(classes, list) or not 1 <= len(classes) <= 255
            or not all(isinstance(c, str) and c for c in classes) or len(set(classes)) != len(classes)):
        raise DataError(f"{path}: 'classes' must be a list of 1 to 255 distinct names, got {classes!r}")

    ignore = meta.get("ignore_index", 255)
    ignore = ignore if isinstance(ignore, list) else [ignore]
    if not all(isinstance(v, int) and len(classes) <= v <= 255 for v in ignore):
        raise DataError(f"{path}: 'ignore_index' must be mask value(s) in {len(classes)}..255 (not a "
                        f"class value), got {meta.get('ignore_index')!r}")

    ignore_colors = meta.get("ignore_color", [])
    ignore_colors = [ignore_colors] if _is_color(ignore_colors) else ignore_colors
    if not isinstance(ignore_colors, list) or not all(_is_color(c) for c in ignore_colors):
        raise DataError(f"{path}: 'ignore_color' must be an [R, G, B] colour (values 0..255) or a list of "
                        f"them, got {meta.get('ignore_color')!r}")
    ignore_colors = np.asarray(ignore_colors, dtype=np.uint8).reshape(-1, 3)

    palette = meta.get("palette")
    if palette is None:
        return ClassFile(path, classes, ignore, bit_palette(len(classes)), False, ignore_colors)
    if not isinstance(palette, list) or len(palette) != len(classes) or not all(_is_color(c) for c in palette):
        raise DataError(f"{path}: 'palette' must hold {len(classes)} [R, G, B] colours with values "
                        f"0..255, one per class")
    return ClassFile(path, classes, ignore, np.asarray(palette, dtype=np.uint8), True, ignore_colors)


def read_class_file(root: Path) -> tuple[list[str], list[int], np.ndarray]:
    """Class names, raw mask values to ignore and palette from ``ROOT/classes.{yaml,json}``."""
    meta = load_class_file(root)
    return meta.classes, meta.ignore, meta.palette


def color_lut_for(meta: ClassFile) -> ColorLut:
    """The colour table of a class file: its palette colours and ignore colours, which must exist
    and be distinct (DataError naming the file otherwise)."""
    if not meta.palette_given:
        raise DataError(f"{meta.path}: colour masks need 'palette' here: one [R, G, B] per class, the "
                        f"colour of that class in the masks (optionally 'ignore_color' for unlabelled pixels)")
    try:
        return ColorLut(meta.palette, meta.ignore_colors, source=f"the palette of {meta.path}")
    except ValueError as e:
        raise DataError(f"{meta.path}: {e}") from None


class FolderDataset(SegmentationDataset):
    """Images and index (or colour) masks in plain folders; see the module docstring for the layout.

    ``mask_format``: ``index`` (default), ``rgb`` or ``auto``. ``mask_dir``: the masks' folder
    relative to ``root`` (default ``masks``; ``masks_index`` after ``prepare folder --to-index``).
    """

    def __init__(self, root: str | Path, split: str = "train", *, require_masks: bool = True,
                 mask_format: str = "index", mask_dir: str | Path = "masks", **kwargs: Any) -> None:
        if mask_format not in MASK_FORMATS:
            raise ValueError(f"mask_format must be one of {', '.join(MASK_FORMATS)}, got {mask_format!r}")
        root = Path(root)
        image_dir, mask_dir = root / "images" / split, root / mask_dir / split
        layout = _LAYOUT.format(root=root, masks=mask_dir.parent.relative_to(root)
                                if mask_dir.is_relative_to(root) else mask_dir.parent)
        hint = "Put your data in this layout, or point dataset.root at it."
        if not image_dir.is_dir():
            raise missing_split_error("Folder dataset", root, split, image_dir, layout, hint)
        meta = load_class_file(root)
        self.class_file = meta.path
        color_lut = None
        if mask_format == "rgb" or (mask_format == "auto" and meta.palette_given):
            color_lut = color_lut_for(meta)
        images = index_files(image_dir, IMAGE_SUFFIXES)
        if mask_dir.is_dir():
            lossy = index_files(mask_dir, (".jpg", ".jpeg"))
            if lossy:
                raise DataError(f"JPEG masks in {mask_dir} ({', '.join(sorted(lossy)[:3])}): JPEG "
                                f"compression changes class values, save masks as PNG")
            masks = index_files(mask_dir, MASK_SUFFIXES)
        elif require_masks:
            raise missing_split_error("Folder dataset", root, split, mask_dir, layout, hint)
        else:
            masks = None
        lut = make_lut({**{v: v for v in range(len(meta.classes))}, **{v: 255 for v in meta.ignore}})
        samples = pair_samples(images, masks, image_dir, mask_dir if masks is not None else None)
        super().__init__(root, split, samples, meta.classes, meta.palette, lut, mask_format=mask_format,
                         color_lut=color_lut, **kwargs)

    def missing_palette_error(self, mask_path: Path) -> DataError:
        return DataError(f"{mask_path}: colour mask, but {self.class_file} gives no 'palette' to read its "
                         f"colours with: add one [R, G, B] per class")
