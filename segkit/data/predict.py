"""A folder of unlabelled images in the label space of a configured dataset, for prediction.

The images carry the dataset's class names, palette and submission format (ADE20K: id + 1,
Cityscapes: labelIds, Pascal Context: the 0..59 context values), but the dataset's own files need
not be on disk: a model trained on ADE20K can label a user's photos on a machine without ADE20K.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from segkit.data import ADE20K_CLASSES, ADE20K_PALETTE, CITYSCAPES_CLASSES, CITYSCAPES_PALETTE, DATASETS
from segkit.data import DEMO_CLASSES, DEMO_PALETTE
from segkit.data.base import IMAGE_SUFFIXES, Sample, SegmentationDataset, index_files, make_lut
from segkit.data.folder import read_class_file
from segkit.data.pascal_context import PASCAL_CONTEXT_CLASSES, PASCAL_CONTEXT_PALETTE
from segkit.data.pascal_context import label_space as pascal_context_label_space
from segkit.errors import DataError

if TYPE_CHECKING:
    from segkit.config import DatasetSettings


# Label spaces fixed by the dataset; a folder dataset's classes live next to its data.
# Pascal Context's entry is its standard 59-class setting; dataset.num_classes=60 picks the other.
_LABEL_SPACES = {"ade20k": (ADE20K_CLASSES, ADE20K_PALETTE), "cityscapes": (CITYSCAPES_CLASSES, CITYSCAPES_PALETTE),
                 "pascal_context": (PASCAL_CONTEXT_CLASSES, PASCAL_CONTEXT_PALETTE), "demo": (DEMO_CLASSES, DEMO_PALETTE)}


def _label_space(settings: DatasetSettings) -> tuple[type[SegmentationDataset], list[str], np.ndarray]:
    name = settings.name
    if name == "folder":
        classes, _, palette = read_class_file(Path(settings.root))
    elif name == "pascal_context" and settings.num_classes is not None:
        classes, palette = pascal_context_label_space(settings.num_classes)
    else:
        classes, palette = _LABEL_SPACES[name]
    return DATASETS[name], list(classes), np.asarray(palette)


def image_folder(settings: DatasetSettings, folder: str | Path) -> SegmentationDataset:
    """Every image below ``folder`` (names keep their subfolders), unlabelled."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DataError(f"predict.input={str(folder)!r} is not a directory of images")
    files = index_files(folder, IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {folder}")
    cls, classes, palette = _label_space(settings)
    # The dataset class supplies encode_prediction (the submission format); its constructor, which
    # lists the dataset's own layout, is skipped.
    dataset = cls.__new__(cls)
    SegmentationDataset.__init__(dataset, folder, "predict", [Sample(k, p, None) for k, p in sorted(files.items())],
                                 classes, palette, make_lut({}), preprocess=settings.preprocess)
    return dataset
