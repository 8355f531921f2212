"""Joint image/mask augmentation (albumentations 2.x) and per-worker seeding.

The training recipe is the original code's: horizontal flip, long side scaled to a random integer
in [0.5, 2.0] x ``base_size``, pad bottom/right to the crop (image 0, mask ignore), random crop,
ImageNet normalisation. Validation keeps the full image and only normalises.

albumentations' ``Compose`` owns a random generator that global seeds do not touch and that every
DataLoader worker inherits unchanged, so without :func:`seed_worker` all workers would draw the
same crops. Pass ``seed=`` to :func:`build_train_transform` to make the main process
(``num_workers=0``) reproducible as well.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

# Must precede the albumentations import: it otherwise checks PyPI for a newer version.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import torch  # noqa: E402
from albumentations.pytorch import ToTensorV2  # noqa: E402
from torch.utils.data import ConcatDataset, Dataset, Subset, get_worker_info  # noqa: E402

from segkit.errors import ConfigError  # noqa: E402

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_SCALE_RANGE = (0.5, 2.0)
IGNORE_INDEX = 255


def _require(cfg: Mapping[str, Any], key: str) -> Any:
    value = cfg.get(key)
    if value is None:
        raise ConfigError(f"dataset config needs '{key}' (see conf/dataset/*.yaml)")
    return value


def _triple(cfg: Mapping[str, Any], key: str, default: Sequence[float]) -> tuple[float, ...]:
    value = cfg.get(key) or default
    if len(value) != 3:
        raise ConfigError(f"dataset.{key} must hold 3 values (R, G, B), got {list(value)}")
    return tuple(float(v) for v in value)


def normalize_transform(
    mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> A.Compose:
    """uint8 HxWx3 image -> normalised float CxHxW tensor; the mask is only converted."""
    return A.Compose(
        [A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0), ToTensorV2()],
        strict=True,
    )


def build_train_transform(cfg: Mapping[str, Any], seed: int | None = None) -> A.Compose:
    """Training augmentation from a dataset config (``base_size``, ``crop_size``, ``mean``,
    ``std``, optional ``scale_range``, ``ignore_index`` and ``jitter``)."""
    base_size = int(_require(cfg, "base_size"))
    crop_size = int(_require(cfg, "crop_size"))
    low, high = cfg.get("scale_range") or DEFAULT_SCALE_RANGE
    if base_size <= 0 or crop_size <= 0 or not 0 < low <= high:
        raise ConfigError(
            f"need base_size > 0, crop_size > 0 and 0 < scale_range[0] <= scale_range[1]; got "
            f"base_size={base_size}, crop_size={crop_size}, scale_range={[low, high]}"
        )
    ignore_index = int(cfg.get("ignore_index", IGNORE_INDEX))
    # The original code draws the long side with random.randint over these integers.
    long_sides = list(range(max(1, int(base_size * low)), int(base_size * high) + 1))
    ops: list[A.BasicTransform] = [
        A.HorizontalFlip(p=0.5),  # first, as in the original code, so padding stays bottom/right
        A.LongestMaxSize(max_size=long_sides, interpolation=cv2.INTER_LINEAR,
                         mask_interpolation=cv2.INTER_NEAREST),
        A.PadIfNeeded(min_height=crop_size, min_width=crop_size, position="top_left",
                      border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=ignore_index),
        A.RandomCrop(height=crop_size, width=crop_size),
    ]
    if cfg.get("jitter", False):
        ops.append(A.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.05, p=0.5))
    ops.append(A.Normalize(mean=_triple(cfg, "mean", IMAGENET_MEAN),
                           std=_triple(cfg, "std", IMAGENET_STD), max_pixel_value=255.0))
    ops.append(ToTensorV2())
    return A.Compose(ops, strict=True, seed=seed)


def build_val_transform(cfg: Mapping[str, Any]) -> A.Compose:
    """Evaluation keeps the full image (multi-scale inference resizes it later)."""
    return normalize_transform(_triple(cfg, "mean", IMAGENET_MEAN), _triple(cfg, "std", IMAGENET_STD))


def _composes(dataset: Dataset) -> Iterator[A.Compose]:
    """The albumentations pipelines of a dataset, looking through Subset / ConcatDataset."""
    if isinstance(dataset, Subset):
        yield from _composes(dataset.dataset)
    elif isinstance(dataset, ConcatDataset):
        for part in dataset.datasets:
            yield from _composes(part)
    else:
        transform = getattr(dataset, "transform", None)
        if isinstance(transform, A.Compose):
            yield transform


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn`` giving each DataLoader worker its own augmentation stream.

    torch seeds every worker with ``base_seed + worker_id``, where ``base_seed`` is drawn from the
    loader's generator at each epoch; reusing it keeps runs reproducible from the run seed
    (``torch.manual_seed`` or ``DataLoader(generator=...)``) while workers and epochs differ.
    """
    info = get_worker_info()
    if info is None:
        return
    seed = torch.initial_seed() % 2**32
    for compose in _composes(info.dataset):
        compose.set_random_seed(seed)


# torch's documentation calls the hook "worker_init_fn"; both names are public.
worker_init_fn = seed_worker
