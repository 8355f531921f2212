"""Normalisation layers a backbone or head can be built with.

SyncBatchNorm is not chosen here: models are built with BatchNorm and converted by the trainer only on
CUDA with more than one process (SyncBatchNorm does not run on CPU), so every checkpoint holds plain
BatchNorm keys and loads anywhere.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import FrozenBatchNorm2d


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
        raise ValueError(f"unknown norm {name!r}; valid choices: {', '.join(NORM_LAYERS)}")
    return NORM_LAYERS[name]


def norm_pooled(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply ``norm`` to a globally pooled (N x C x 1 x 1) tensor, also for a batch of one.

    With one image per process a BatchNorm after a global pool sees one value per channel, where
    batch statistics are undefined (PyTorch raises; the original ResNeSt code crashes there). Such
    a step is normalised with the running statistics, as in eval mode, and leaves them unchanged.
    SyncBatchNorm is exempt: it pools the statistics of all ranks.
    """
    if (norm.training and x.shape[0] == 1 and isinstance(norm, nn.modules.batchnorm._BatchNorm)
            and not isinstance(norm, nn.SyncBatchNorm) and norm.running_mean is not None):
        return F.batch_norm(x, norm.running_mean, norm.running_var, norm.weight, norm.bias, False, 0.0, norm.eps)
    return norm(x)
