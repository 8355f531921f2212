"""PASCAL Context (VOC2010 images, Detail API annotations): 4998 train / 5105 val images.

The standard protocol keeps 59 classes. Annotation category ids are mapped through the sorted
list :data:`CONTEXT_CATEGORY_IDS` to the values 0..59 (0 = background, and every id not in the
list is background too); these values are what the mask PNGs hold, in mmsegmentation's layout::

    ROOT/VOCdevkit/VOC2010/JPEGImages/<name>.jpg
    ROOT/VOCdevkit/VOC2010/SegmentationClassContext/<name>.png          values 0..59
    ROOT/VOCdevkit/VOC2010/ImageSets/SegmentationContext/{train,val}.txt

(``python -m segkit.data.prepare pascal_context`` writes exactly this from the Detail API's
``trainval_merged.json``; trees converted by mmsegmentation's ``pascal_context.py`` load as
they are). With ``num_classes=59`` (the benchmark's setting) value v becomes train id v - 1 and
background is ignored (255); with ``num_classes=60`` background is class 0 and values are train
ids as they are. Either way :meth:`PascalContextDataset.encode_prediction` gives back the 0..59
values (59 classes: prediction + 1, PyTorch-Encoding's ``pred_offset``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from segkit.data.ade20k import ADE20K_PALETTE
from segkit.data.base import Sample, SegmentationDataset, _examples, make_lut, missing_split_error
from segkit.errors import ConfigError, DataError

DEVKIT_DIR = Path("VOCdevkit", "VOC2010")
IMAGE_DIR = "JPEGImages"
MASK_DIR = "SegmentationClassContext"
SPLIT_DIR = Path("ImageSets", "SegmentationContext")
ANNOTATION_JSON = "trainval_merged.json"
VOC2010_URL = "http://host.robots.ox.ac.uk/pascal/VOC/voc2010/VOCtrainval_03-May-2010.tar"
ANNOTATION_URL = "https://codalabuser.blob.core.windows.net/public/trainval_merged.json"

# Detail API category ids kept by the 59-class protocol (PyTorch-Encoding's pcontext.py and
# mmsegmentation's converter, sorted); position in this list = mask value, 0 = background.
CONTEXT_CATEGORY_IDS: tuple[int, ...] = (
    0, 2, 9, 18, 19, 22, 23, 25, 31, 33, 34, 44, 45, 46, 59, 65, 68, 72, 80, 85, 98, 104, 105, 113,
    115, 144, 158, 159, 162, 187, 189, 207, 220, 232, 258, 259, 260, 284, 295, 296, 308, 324, 326,
    347, 349, 354, 355, 360, 366, 368, 397, 415, 416, 420, 424, 427, 440, 445, 454, 458,
)
_VALUE_OF_CATEGORY = {category: value for value, category in enumerate(CONTEXT_CATEGORY_IDS)}

# The classes of those ids, in the same order (alphabetical: the Detail ids follow the names),
# named as in mmsegmentation's PascalContextDataset59.
PASCAL_CONTEXT_CLASSES: tuple[str, ...] = (
    "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book", "bottle",
    "building", "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow",
    "cup", "curtain", "dog", "door", "fence", "floor", "flower", "food", "grass", "ground",
    "horse", "keyboard", "light", "motorbike", "mountain", "mouse", "person", "plate", "platform",
    "pottedplant", "road", "rock", "sheep", "shelves", "sidewalk", "sign", "sky", "snow", "sofa",
    "table", "track", "train", "tree", "truck", "tvmonitor", "wall", "water", "window", "wood",
)
PASCAL_CONTEXT60_CLASSES: tuple[str, ...] = ("background", *PASCAL_CONTEXT_CLASSES)
# mmsegmentation's Pascal Context palettes: the 60-class one is ADE20K's first 60 colours, the
# 59-class one the same without the background colour.
PASCAL_CONTEXT60_PALETTE = ADE20K_PALETTE[:60].copy()
PASCAL_CONTEXT_PALETTE = PASCAL_CONTEXT60_PALETTE[1:].copy()
NUM_CLASSES_CHOICES = (59, 60)

# Mask value (0..59) -> train id.
LUT_59 = make_lut({0: 255, **{value: value - 1 for value in range(1, 60)}})
LUT_60 = make_lut({value: value for value in range(60)})

_LAYOUT = f"""  {{root}}/{DEVKIT_DIR.as_posix()}/{IMAGE_DIR}/<name>.jpg
  {{root}}/{DEVKIT_DIR.as_posix()}/{MASK_DIR}/<name>.png   (values 0..59, 0 = background)
  {{root}}/{DEVKIT_DIR.as_posix()}/{SPLIT_DIR.as_posix()}/{{{{train,val}}}}.txt"""


def context_value(category_id: int) -> int:
    """Mask value 0..59 of a Detail API category id; ids outside the 59 classes are background
    (0), never another class."""
    return _VALUE_OF_CATEGORY.get(category_id, 0)


def check_num_classes(num_classes: int) -> int:
    if num_classes not in NUM_CLASSES_CHOICES:
        raise ConfigError(f"dataset.num_classes={num_classes} is not a Pascal Context setting: use 59 (the "
                          f"standard protocol, background ignored) or 60 (background as class 0)")
    return num_classes


def label_space(num_classes: int = 59) -> tuple[tuple[str, ...], np.ndarray]:
    """Class names and palette of the 59- or 60-class setting."""
    if check_num_classes(num_classes) == 59:
        return PASCAL_CONTEXT_CLASSES, PASCAL_CONTEXT_PALETTE
    return PASCAL_CONTEXT60_CLASSES, PASCAL_CONTEXT60_PALETTE


def context_base(root: Path) -> Path:
    """``ROOT/VOCdevkit/VOC2010``, or ``ROOT`` itself when it is that folder."""
    if not (root / DEVKIT_DIR).is_dir() and (root / IMAGE_DIR).is_dir():
        return root
    return root / DEVKIT_DIR


def prepare_hint(root: Path) -> str:
    return (f"Download {VOC2010_URL} and extract it into {root}, put {ANNOTATION_URL} (the Detail "
            f"API's annotations) in {root / DEVKIT_DIR}, then run: python -m segkit.data.prepare "
            f"pascal_context --root {root}")


class PascalContextDataset(SegmentationDataset):
    """The layout in the module docstring; splits are the lists in ``ImageSets/SegmentationContext``
    (``train``, ``val``). ``ROOT`` may also be the ``VOC2010`` folder itself.

    ``num_classes``: 59 (the standard protocol, background ignored) or 60 (background as class 0).
    """

    def __init__(self, root: str | Path, split: str = "train", *, num_classes: int = 59, **kwargs: Any) -> None:
        classes, palette = label_space(num_classes)
        root = Path(root)
        base = context_base(root)
        layout, hint = _LAYOUT.format(root=root), prepare_hint(root)
        list_file = base / SPLIT_DIR / f"{split}.txt"
        if not list_file.is_file():
            lists = list_file.parent
            found = sorted(p.stem for p in lists.glob("*.txt")) if lists.is_dir() else []
            raise missing_split_error("Pascal Context", root, split, list_file, layout, hint, available=found)
        image_dir, mask_dir = base / IMAGE_DIR, base / MASK_DIR
        for directory in (image_dir, mask_dir):
            if not directory.is_dir():
                raise missing_split_error("Pascal Context", root, split, directory, layout, hint)
        try:
            names = list_file.read_text(encoding="utf-8").split()
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{list_file}: cannot read ({e})") from None
        if not names:
            raise DataError(f"split is empty: {list_file} lists no images")
        images, masks = set(os.listdir(image_dir)), set(os.listdir(mask_dir))
        problems = []
        for what, directory, present, suffix in (("image", image_dir, images, ".jpg"),
                                                 ("mask", mask_dir, masks, ".png")):
            missing = [n for n in names if n + suffix not in present]
            if missing:
                problems.append(f"{len(missing)} {what}(s) listed in {list_file} are missing from "
                                f"{directory} ({_examples(missing)})")
        if problems:
            raise DataError("; ".join(problems))
        samples = [Sample(n, image_dir / f"{n}.jpg", mask_dir / f"{n}.png") for n in names]
        lut = LUT_59 if num_classes == 59 else LUT_60
        super().__init__(root, split, samples, classes, palette, lut, **kwargs)

    def encode_prediction(self, pred: np.ndarray) -> np.ndarray:
        """The 0..59 label values of ``SegmentationClassContext`` (0 = background): prediction + 1
        with 59 classes (PyTorch-Encoding's ``pred_offset``), the prediction itself with 60."""
        pred = self._check_prediction(pred)
        return (pred + 1 if self.num_classes == 59 else pred).astype(np.uint8)
