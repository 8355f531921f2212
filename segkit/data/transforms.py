"""Joint image/mask augmentation of the training recipe (albumentations 2.x).

The recipe is the original code's: horizontal flip, long side scaled to a random integer in
[0.5, 2.0] x ``base_size``, pad bottom/right to the crop (image 0, mask ignore), random crop,
normalisation (:class:`~segkit.data.preprocess.Preprocess`). Evaluation reads whole images and
normalises them itself.

albumentations' ``Compose`` owns a random generator that global seeds do not touch; training
seeds it per sample (:class:`segkit.training.sampler.SeededSamples`). Pass ``seed=`` to
:func:`build_train_transform` to make a standalone pipeline reproducible.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

# Must precede the albumentations import: it otherwise checks PyPI for a newer version.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
from albumentations.pytorch import ToTensorV2  # noqa: E402

from segkit.data.preprocess import Preprocess  # noqa: E402

DEFAULT_SCALE_RANGE = (0.5, 2.0)
IGNORE_INDEX = 255


def normalize_transform(preprocess: Preprocess = Preprocess()) -> A.Compose:
    """uint8 HxWx3 image -> normalised float CxHxW tensor; the mask is only converted."""
    return A.Compose([_normalize(preprocess), ToTensorV2()], strict=True)


def _normalize(preprocess: Preprocess) -> A.Normalize:
    return A.Normalize(mean=tuple(preprocess.mean), std=tuple(preprocess.std), max_pixel_value=255.0)


def build_train_transform(base_size: int, crop_size: int, scale_range: Sequence[float] = DEFAULT_SCALE_RANGE,
                          preprocess: Preprocess = Preprocess(), jitter: bool = False,
                          seed: int | None = None) -> A.Compose:
    """The training augmentation: flip, random long side in ``scale_range`` x ``base_size``, pad,
    ``crop_size`` crop, optional colour jitter, normalisation."""
    low, high = scale_range
    if base_size <= 0 or crop_size <= 0 or not 0 < low <= high:
        raise ValueError(
            f"need base_size > 0, crop_size > 0 and 0 < scale_range[0] <= scale_range[1]; got "
            f"base_size={base_size}, crop_size={crop_size}, scale_range={[low, high]}"
        )
    # The original code draws the long side with random.randint over these integers.
    long_sides = list(range(max(1, int(base_size * low)), int(base_size * high) + 1))
    ops: list[A.BasicTransform] = [
        A.HorizontalFlip(p=0.5),  # first, as in the original code, so padding stays bottom/right
        A.LongestMaxSize(max_size=long_sides, interpolation=cv2.INTER_LINEAR,
                         mask_interpolation=cv2.INTER_NEAREST),
        A.PadIfNeeded(min_height=crop_size, min_width=crop_size, position="top_left",
                      border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=IGNORE_INDEX),
        A.RandomCrop(height=crop_size, width=crop_size),
    ]
    if jitter:
        ops.append(A.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.05, p=0.5))
    ops += [_normalize(preprocess), ToTensorV2()]
    return A.Compose(ops, strict=True, seed=seed)
