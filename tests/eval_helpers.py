"""Stub networks and a fake dataset following segkit's contracts, shared by the evaluation tests.

The stub networks are per-pixel (1x1 conv) or translation-equivariant (3x3 convs), so expected
outputs can be derived independently.
"""
import numpy as np
import torch
from torch import nn

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class PixelNet(nn.Module):
    """Per-pixel class scores: flip- and scale-equivariant, no context at all."""

    def __init__(self, num_classes: int, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, num_classes, 1)

    def forward(self, x):
        return {"out": self.conv(x)}


class ConvNet(nn.Module):
    """Two zero-padded 3x3 convs: translation-equivariant with a 2-pixel reach."""

    def __init__(self, num_classes: int, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(8, num_classes, 3, padding=1))

    def forward(self, x):
        return {"out": self.body(x)}


class StrideNet(PixelNet):
    """Refuses inputs that are not a multiple of its output stride, as a real backbone would
    misalign them."""

    def forward(self, x):
        assert x.shape[-2] % 8 == 0 and x.shape[-1] % 8 == 0, x.shape
        return super().forward(x)


class FakeDataset:
    """Follows the segkit dataset contract (ADE20K-style submission: prediction + 1)."""

    def __init__(self, sizes, num_classes=4, seed=0, unlabelled=()):
        rng = np.random.default_rng(seed)
        self.num_classes = num_classes
        self.classes = [f"class{i}" for i in range(num_classes)]
        self.ignore_index = 255
        self.palette = rng.integers(0, 256, (num_classes, 3), dtype=np.uint8)
        self.images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]
        self.masks = []
        for i, image in enumerate(self.images):
            # Labels correlated with the colour so that a PixelNet gets some classes right.
            mask = (image.astype(int).sum(-1) * num_classes // 766).astype(np.uint8)
            mask[rng.random(mask.shape) < 0.1] = 255
            self.masks.append(None if i in unlabelled else mask)

    def __len__(self):
        return len(self.images)

    def load(self, i):
        return self.images[i], self.masks[i]

    def name(self, i):
        return f"city{i % 2}/img_{i:03d}"

    def encode_prediction(self, pred):
        return (pred + 1).astype(np.uint8)


def normalise(image: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(image).permute(2, 0, 1).float() / 255
    return (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


def multiscale(model: nn.Module, image: torch.Tensor, scales, flip: bool, base_size: int, crop_size: int,
               num_classes: int, *, pad_value=0.0, argmax: bool = False, **options) -> torch.Tensor:
    """``predict_multiscale`` with its views and geometry given positionally, as the tests spell
    them, and any other inference option as a keyword."""
    from segkit.inference.multiscale import predict_multiscale
    from segkit.inference.options import InferenceOptions

    return predict_multiscale(model, image, InferenceOptions(scales=scales, flip=flip, **options), base_size=base_size,
                              crop_size=crop_size, num_classes=num_classes, pad_value=pad_value, argmax=argmax)
