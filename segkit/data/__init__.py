"""Datasets returning (image, mask) pairs with masks in train ids and 255 = ignore.

``build_dataset(cfg.dataset, split)`` builds one from a ``conf/dataset/*.yaml`` node; ``split`` is
a split name of the dataset's layout or one of the aliases ``train`` / ``val`` (resolved through
``train_split`` / ``val_split``). A folder dataset also takes ``mask_format`` (index | rgb | auto)
and ``mask_dir`` (default ``masks``).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from segkit.data.ade20k import ADE20K_CLASSES, ADE20K_PALETTE, ADE20KDataset
from segkit.data.base import MASK_FORMATS, SegmentationDataset
from segkit.data.cityscapes import CITYSCAPES_CLASSES, CITYSCAPES_PALETTE, CityscapesDataset
from segkit.data.demo import DEMO_CLASSES, DEMO_PALETTE, DemoDataset
from segkit.data.folder import FolderDataset
from segkit.data.transforms import build_train_transform, build_val_transform, seed_worker, worker_init_fn
from segkit.errors import ConfigError

if TYPE_CHECKING:
    import albumentations as A

DATASETS: dict[str, type[SegmentationDataset]] = {
    "ade20k": ADE20KDataset,
    "cityscapes": CityscapesDataset,
    "folder": FolderDataset,
    "demo": DemoDataset,
}

__all__ = [
    "ADE20K_CLASSES", "ADE20K_PALETTE", "ADE20KDataset", "CITYSCAPES_CLASSES", "CITYSCAPES_PALETTE",
    "CityscapesDataset", "DATASETS", "DEMO_CLASSES", "DEMO_PALETTE", "DemoDataset", "FolderDataset",
    "SegmentationDataset", "build_dataset", "build_train_transform", "build_val_transform",
    "seed_worker", "worker_init_fn",
]


def build_dataset(cfg: Mapping[str, Any], split: str, transform: A.Compose | None = None) -> SegmentationDataset:
    """The dataset named by ``cfg.name`` (one of :data:`DATASETS`) for ``split``.

    Without ``transform`` items are only normalised (``cfg.mean`` / ``cfg.std``); pass
    ``build_train_transform(cfg)`` or ``build_val_transform(cfg)`` for the recipe.
    """
    name = cfg.get("name")
    if name not in DATASETS:
        raise ConfigError(f"dataset.name={name!r} is not a known dataset; choose one of {', '.join(DATASETS)}")
    if not cfg.get("root"):
        raise ConfigError(f"dataset.root is not set for dataset '{name}'")
    splits = {"train": cfg.get("train_split"), "val": cfg.get("val_split")}
    split = splits.get(split) or split
    kwargs: dict[str, Any] = {
        "transform": transform,
        "map_out_of_range_to_ignore": bool(cfg.get("map_out_of_range_to_ignore", False)),
    }
    for key in ("mean", "std"):
        if cfg.get(key) is not None:
            kwargs[key] = tuple(cfg[key])
    if name == "demo":
        kwargs.update({key: int(cfg[key]) for key in ("seed", "num_train", "num_val", "image_size")
                       if cfg.get(key) is not None})
    mask_format = cfg.get("mask_format") or "index"
    if mask_format not in MASK_FORMATS:
        raise ConfigError(f"dataset.mask_format={mask_format!r}; choose one of {', '.join(MASK_FORMATS)}")
    if name == "folder":
        # Training and validation need masks; other splits (e.g. test) may be unlabelled.
        kwargs["require_masks"] = split in splits.values()
        kwargs["mask_format"] = mask_format
        kwargs["mask_dir"] = cfg.get("mask_dir") or "masks"
    elif mask_format != "index" or cfg.get("mask_dir") not in (None, "", "masks"):
        raise ConfigError(f"dataset.mask_format / dataset.mask_dir apply to the folder dataset only; "
                          f"the {name} dataset has its own mask layout")
    dataset = DATASETS[name](cfg["root"], split, **kwargs)

    expected = cfg.get("num_classes")
    if expected is not None and int(expected) != dataset.num_classes:
        raise ConfigError(f"dataset.num_classes={expected} but the {name} dataset at {cfg['root']} "
                          f"has {dataset.num_classes} classes; fix the config or the class list")
    ignore_index = cfg.get("ignore_index")
    if ignore_index is not None and int(ignore_index) != dataset.ignore_index:
        raise ConfigError(f"dataset.ignore_index={ignore_index}: masks are always remapped to "
                          f"{dataset.ignore_index} for ignore; leave it at {dataset.ignore_index}")
    return dataset
