"""How an image becomes the network's input: one definition for training and inference.

Images are scaled to 0..1 and normalised per channel with ``mean`` / ``std``; padding (crops at the
border in training, windows and output-stride padding at inference) is a black pixel, which after
normalisation is ``-mean / std`` per channel.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """Per-channel (R, G, B) normalisation of 0..1 images."""

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean and std need 3 values each and std > 0, got mean={list(self.mean)}, "
                             f"std={list(self.std)}")

    @property
    def pad_value(self) -> tuple[float, float, float]:
        """The normalised value of a black pixel, per channel."""
        return tuple(-m / s for m, s in zip(self.mean, self.std))

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 H x W x 3 (any device) -> normalised float32 3 x H x W on the same device."""
        return self.normalize(image.permute(2, 0, 1).float().div_(255))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """float32 3 x H x W with values 0..1 -> normalised, in place."""
        mean = torch.tensor(self.mean, device=x.device).view(3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(3, 1, 1)
        return x.sub_(mean).div_(std)
