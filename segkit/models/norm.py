"""Normalisation layers a backbone or head can be built with.

SyncBatchNorm is not chosen here: models are built with BatchNorm and converted by the trainer only on
CUDA with more than one process (SyncBatchNorm does not run on CPU), so every checkpoint holds plain
BatchNorm keys and loads anywhere.
"""
from __future__ import annotations

from typing import Callable

from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from segkit.errors import ConfigError

NormLayer = Callable[[int], nn.Module]


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups (Wu & He, 2018), fewer for narrow layers so that every group holds at
    least two channels: the attention layers see a 1x1 map, where a one-channel group is undefined."""
    return nn.GroupNorm(min(32, channels // 2), channels)


NORM_LAYERS: dict[str, NormLayer] = {
    "bn": nn.BatchNorm2d,
    # Statistics and affine parameters fixed: fine-tuning with very small batches.
    "frozen_bn": FrozenBatchNorm2d,
    "gn": group_norm,
}


def get_norm_layer(name: str) -> NormLayer:
    """Return the constructor for norm ``name`` (one of :data:`NORM_LAYERS`)."""
    if name not in NORM_LAYERS:
        raise ConfigError(f"unknown norm {name!r}; valid choices: {', '.join(NORM_LAYERS)}")
    return NORM_LAYERS[name]
