"""Datasets returning (image, mask) pairs with masks in train ids and 255 = ignore.

``build_dataset(settings, split)`` builds one from the typed dataset settings
(:class:`segkit.settings.DatasetSettings`); ``split`` is a split name of the dataset's layout or one
of the aliases ``train`` / ``val`` (resolved through ``train_split`` / ``val_split``). A folder
dataset also takes ``mask_format`` (index | rgb | auto) and ``mask_dir`` (default ``masks``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from segkit.data.ade20k import ADE20K_CLASSES, ADE20K_PALETTE, ADE20KDataset
from segkit.data.base import SegmentationDataset
from segkit.data.cityscapes import CITYSCAPES_CLASSES, CITYSCAPES_PALETTE, CityscapesDataset
from segkit.data.demo import DEMO_CLASSES, DEMO_PALETTE, DemoDataset
from segkit.data.folder import FolderDataset
from segkit.data.pascal_context import PASCAL_CONTEXT_CLASSES, PASCAL_CONTEXT_PALETTE, PascalContextDataset
from segkit.data.preprocess import Preprocess
from segkit.data.transforms import build_train_transform
from segkit.errors import ConfigError

if TYPE_CHECKING:
    import albumentations as A

    from segkit.settings import DatasetSettings

DATASETS: dict[str, type[SegmentationDataset]] = {
    "ade20k": ADE20KDataset,
    "cityscapes": CityscapesDataset,
    "pascal_context": PascalContextDataset,
    "folder": FolderDataset,
    "demo": DemoDataset,
}

__all__ = [
    "ADE20K_CLASSES", "ADE20K_PALETTE", "ADE20KDataset", "CITYSCAPES_CLASSES", "CITYSCAPES_PALETTE",
    "CityscapesDataset", "DATASETS", "DEMO_CLASSES", "DEMO_PALETTE", "DemoDataset", "FolderDataset",
    "PASCAL_CONTEXT_CLASSES", "PASCAL_CONTEXT_PALETTE", "PascalContextDataset", "Preprocess",
    "SegmentationDataset", "build_dataset", "build_train_transform", "train_transform",
]


def train_transform(settings: DatasetSettings) -> A.Compose:
    """The training augmentation of the recipe for these dataset settings."""
    return build_train_transform(settings.base_size, settings.crop_size, settings.scale_range,
                                 settings.preprocess, settings.jitter)


def build_dataset(settings: DatasetSettings, split: str, transform: A.Compose | None = None) -> SegmentationDataset:
    """The dataset ``settings.name`` (one of :data:`DATASETS`) for ``split``.

    Without ``transform`` items are only normalised; pass :func:`train_transform` for the recipe.
    """
    name = settings.name
    if name not in DATASETS:
        raise ConfigError(f"dataset.name={name!r} is not a known dataset; choose one of {', '.join(DATASETS)}")
    splits = {"train": settings.train_split, "val": settings.val_split}
    split = splits.get(split) or split
    kwargs: dict[str, Any] = {"transform": transform, "preprocess": settings.preprocess,
                              "map_out_of_range_to_ignore": settings.map_out_of_range_to_ignore}
    if name == "demo":
        kwargs.update(seed=settings.seed, num_train=settings.num_train, num_val=settings.num_val,
                      image_size=settings.image_size)
    if name == "pascal_context" and settings.num_classes is not None:
        kwargs["num_classes"] = settings.num_classes  # 59 or 60: the class list depends on it
    if name == "folder":
        # Training and validation need masks; other splits (e.g. test) may be unlabelled.
        kwargs.update(require_masks=split in splits.values(), mask_format=settings.mask_format,
                      mask_dir=settings.mask_dir)
    dataset = DATASETS[name](settings.root, split, **kwargs)

    expected = settings.num_classes
    if expected is not None and expected != dataset.num_classes:
        raise ConfigError(f"dataset.num_classes={expected} but the {name} dataset at {settings.root} "
                          f"has {dataset.num_classes} classes; fix the config or the class list")
    return dataset
