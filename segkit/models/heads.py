"""DeepLabV3 (ASPP) head and the auxiliary FCN head, as in the original ResNeSt segmentation code."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from segkit.models.dilated import DilatedConv2d
from segkit.models.maps import memory_format_of, spatial_mean
from segkit.models.norm import NormLayer, norm_pooled

# ASPP atrous rates per backbone output stride (Chen et al. 2017; doubled at stride 8).
ASPP_RATES: dict[int, tuple[int, int, int]] = {8: (12, 24, 36), 16: (6, 12, 18)}


def conv_norm_relu(in_ch: int, out_ch: int, kernel_size: int, norm_layer: NormLayer,
                   dilation: int = 1) -> nn.Sequential:
    if kernel_size == 3 and dilation > 1:  # the ASPP's atrous branches: a faster bf16 form on CPU
        conv = DilatedConv2d(in_ch, out_ch, dilation)
    else:
        padding = dilation * (kernel_size - 1) // 2
        conv = nn.Conv2d(in_ch, out_ch, kernel_size, padding=padding, dilation=dilation, bias=False)
    return nn.Sequential(conv, norm_layer(out_ch), nn.ReLU(inplace=True))


class ASPPPooling(nn.Module):
    """Image-level branch: global average pool -> 1x1 conv -> norm -> ReLU -> upsample."""

    def __init__(self, in_ch: int, out_ch: int, norm_layer: NormLayer) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 1, bias=False)
        self.norm = norm_layer(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.relu(norm_pooled(self.norm, self.conv(spatial_mean(x))), inplace=True)
        # Bilinear from 1x1 is a broadcast; materialised in x's memory format, so that the ASPP's
        # concatenation keeps it (a broadcast view makes the concatenation NCHW, copied back by the
        # projection's convolution under channels_last).
        shape = (-1, -1, x.shape[2], x.shape[3])
        return pooled.expand(shape).contiguous(memory_format=memory_format_of(x))


class ASPP(nn.Module):
    """Five parallel branches (1x1, three dilated 3x3, image pooling) fused by a 1x1 conv."""

    def __init__(self, in_ch: int, rates: tuple[int, int, int], norm_layer: NormLayer, out_ch: int = 256,
                 dropout: float = 0.5) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            [conv_norm_relu(in_ch, out_ch, 1, norm_layer)]
            + [conv_norm_relu(in_ch, out_ch, 3, norm_layer, dilation=r) for r in rates]
            + [ASPPPooling(in_ch, out_ch, norm_layer)])
        self.project = nn.Sequential(conv_norm_relu(5 * out_ch, out_ch, 1, norm_layer), nn.Dropout2d(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([branch(x) for branch in self.branches], dim=1))


class DeepLabV3Head(nn.Module):
    """ASPP on c4 -> 3x3 conv -> norm -> ReLU -> dropout -> 1x1 classifier."""

    def __init__(self, in_ch: int, num_classes: int, output_stride: int, norm_layer: NormLayer,
                 channels: int = 256, aspp_dropout: float = 0.5, dropout: float = 0.1) -> None:
        super().__init__()
        self.aspp = ASPP(in_ch, ASPP_RATES[output_stride], norm_layer, channels, aspp_dropout)
        self.block = nn.Sequential(conv_norm_relu(channels, channels, 3, norm_layer), nn.Dropout(dropout))
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.block(self.aspp(x)))


class FCNHead(nn.Module):
    """Auxiliary head on c3: 3x3 conv -> norm -> ReLU -> dropout -> 1x1 classifier."""

    def __init__(self, in_ch: int, num_classes: int, norm_layer: NormLayer, channels: int = 256,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.block = nn.Sequential(conv_norm_relu(in_ch, channels, 3, norm_layer), nn.Dropout(dropout))
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.block(x))
