"""ResNeSt (Split-Attention networks, Zhang et al. 2020) and the ResNet-D baselines it is compared to.

The layout follows the original code so that its ImageNet checkpoints (and timm's resnest*/resnet*d
weights, which share the keys) load with strict key matching:

- radix-major Split-Attention 3x3 conv (paper Sec. 3.2): ``conv2.{conv,bn0,fc1,bn1,fc2}``;
- deep stem of three 3x3 convs ``conv1.{0,1,3,4,6}`` + ``bn1``; avg-down shortcut ``downsample.{1,2}``;
- "avd": a 3x3 average pool after the 3x3 conv (before it in the paper's "fast" ablation variants)
  that carries the block's stride, also in the first block of a dilated stage (as a stride-1 pool);
- dilation for output stride 8/16 with half the dilation in the first block of a dilated stage.

The forward pass returns the four stage outputs ``[c1, c2, c3, c4]`` for dense prediction; the
ImageNet classifier (``fc``) exists only when ``num_classes > 0`` and is applied by ``forward_head``.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from segkit.models.checkpointing import recomputed
from segkit.models.maps import memory_format_of, recording_graph, spatial_mean
from segkit.models.norm import NormLayer, norm_pooled


class SplitAttention(nn.Module):
    """Split-Attention conv in the radix-major layout (paper Sec. 3.2, Fig. 4).

    ``radix`` splits per cardinal group share one grouped conv; their sum is pooled, two grouped
    1x1 convs predict one weight per split and channel, a softmax over the splits (sigmoid when
    radix is 1) mixes them back into ``channels`` outputs.
    """

    def __init__(
        self,
        in_channels: int,
        channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        dilation: int = 1,
        cardinality: int = 1,
        radix: int = 2,
        reduction_factor: int = 4,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        inter_channels = max(in_channels * radix // reduction_factor, 32)
        self.radix = radix
        self.cardinality = cardinality
        padding = dilation * (kernel_size - 1) // 2
        self.conv = nn.Conv2d(in_channels, channels * radix, kernel_size, stride, padding, dilation,
                              groups=cardinality * radix, bias=False)
        self.bn0 = norm_layer(channels * radix)
        self.fc1 = nn.Conv2d(channels, inter_channels, 1, groups=cardinality)
        self.bn1 = norm_layer(inter_channels)
        self.fc2 = nn.Conv2d(inter_channels, channels * radix, 1, groups=cardinality)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn0(self.conv(x)), inplace=True)
        gap = spatial_mean(x)
        if self.radix > 1:
            # Pool, then sum the splits (both linear, so the order is free): no full-size map of the sum.
            gap = gap.unflatten(1, (self.radix, -1)).sum(dim=1)
        attn = self.fc2(F.relu(norm_pooled(self.bn1, self.fc1(gap)), inplace=True))
        if self.radix == 1:
            return x * torch.sigmoid(attn)
        # fc2 is grouped by cardinality, so its channels are (card, radix, c); the splits are
        # radix-major (radix, card, c): softmax over radix, then flatten to the split layout.
        attn = attn.unflatten(1, (self.cardinality, self.radix, -1)).transpose(1, 2).softmax(dim=1)
        attn = attn.flatten(2).unflatten(2, (-1, 1, 1))  # (B, radix, C, 1, 1)
        # (B, radix*C, H, W) -> (B, radix, C, H, W); -1 keeps batch and channels symbolic for tracing.
        splits = x.unflatten(1, (self.radix, -1))
        if torch.is_grad_enabled():
            return (splits * attn).sum(dim=1)
        # Inference: accumulate split by split instead of materialising the radix-times larger
        # product (4x faster on CPU in channels_last; with autograd the slices' backward costs more),
        # into a map in x's memory format (see memory_format_of: else the avd pool returns NCHW).
        if recording_graph():
            # A graph may be run with autograd on, which refuses out= arguments.
            out = splits[:, 0] * attn[:, 0]
        else:
            out = torch.empty_like(splits[:, 0], memory_format=memory_format_of(x))
            torch.mul(splits[:, 0], attn[:, 0], out=out)
        for r in range(1, self.radix):
            out.addcmul_(splits[:, r], attn[:, r])
        return out


class Bottleneck(nn.Module):
    """ResNeSt bottleneck (radix >= 1) or the plain ResNet-D bottleneck (radix 0)."""

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        dilation: int = 1,
        downsample: nn.Module | None = None,
        radix: int = 2,
        cardinality: int = 1,
        bottleneck_width: int = 64,
        avd: bool = True,
        avd_first: bool = False,
        is_first: bool = False,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        group_width = int(planes * (bottleneck_width / 64.0)) * cardinality
        self.radix = radix
        self.conv1 = nn.Conv2d(inplanes, group_width, 1, bias=False)
        self.bn1 = norm_layer(group_width)
        # The original code pools in every stage's first block, even at stride 1 (dilated stages).
        use_avd = avd and (stride > 1 or is_first)
        self.avd_first = avd_first
        self.avd_layer = nn.AvgPool2d(3, stride, padding=1) if use_avd else None
        conv_stride = 1 if use_avd else stride
        if radix >= 1:
            self.conv2 = SplitAttention(group_width, group_width, 3, conv_stride, dilation, cardinality,
                                        radix, norm_layer=norm_layer)
            self.bn2 = None
        else:
            self.conv2 = nn.Conv2d(group_width, group_width, 3, conv_stride, dilation, dilation,
                                   groups=cardinality, bias=False)
            self.bn2 = norm_layer(group_width)
        self.conv3 = nn.Conv2d(group_width, planes * self.expansion, 1, bias=False)
        self.bn3 = norm_layer(planes * self.expansion)
        self.downsample = downsample

    def zero_init_last(self) -> None:
        """Start the residual branch at zero so each block begins as the identity (paper Sec. 4.2)."""
        if getattr(self.bn3, "weight", None) is not None:
            nn.init.zeros_(self.bn3.weight)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """The residual branch up to conv3's output (bn3 is applied by :meth:`merge`)."""
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        if self.avd_layer is not None and self.avd_first:
            out = self.avd_layer(out)
        out = self.conv2(out)
        if self.bn2 is not None:
            out = F.relu(self.bn2(out), inplace=True)
        if self.avd_layer is not None and not self.avd_first:
            out = self.avd_layer(out)
        return self.conv3(out)

    def merge(self, branch: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The block's output from its branch's output and its input."""
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.bn3(branch)
        if torch.is_grad_enabled():
            return F.relu(out + shortcut, inplace=True)
        # Inference: add into the branch's fresh output instead of allocating another full-size map.
        return F.relu(out.add_(shortcut), inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.merge(self.branch(x), x)


# Dilation of the last two stages per output stride: (stride, dilation, first-block dilation).
_DILATED_STAGES: dict[int, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    32: ((2, 1, 1), (2, 1, 1)),
    16: ((2, 1, 1), (1, 2, 1)),
    8: ((1, 2, 1), (1, 4, 2)),
}


class ResNeSt(nn.Module):
    """ResNeSt / ResNet-D backbone returning the four stage outputs ``[c1, c2, c3, c4]``."""

    def __init__(
        self,
        layers: tuple[int, int, int, int],
        radix: int = 2,
        cardinality: int = 1,
        bottleneck_width: int = 64,
        stem_width: int = 32,
        avd: bool = True,
        avd_first: bool = False,
        output_stride: int = 32,
        norm_layer: NormLayer = nn.BatchNorm2d,
        num_classes: int = 0,
        zero_init_last: bool = False,
    ) -> None:
        super().__init__()
        if output_stride not in _DILATED_STAGES:
            raise ValueError(f"output_stride must be one of {sorted(_DILATED_STAGES)}, got {output_stride!r}")
        self.output_stride = output_stride
        self.grad_checkpointing = False
        self.selective_recompute = False
        self.inplanes = 2 * stem_width
        self._block_args = dict(radix=radix, cardinality=cardinality, bottleneck_width=bottleneck_width,
                                avd=avd, avd_first=avd_first, norm_layer=norm_layer)
        self.conv1 = nn.Sequential(
            nn.Conv2d(3, stem_width, 3, 2, 1, bias=False), norm_layer(stem_width), nn.ReLU(inplace=True),
            nn.Conv2d(stem_width, stem_width, 3, 1, 1, bias=False), norm_layer(stem_width), nn.ReLU(inplace=True),
            nn.Conv2d(stem_width, 2 * stem_width, 3, 1, 1, bias=False),
        )
        self.bn1 = norm_layer(2 * stem_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        (s3, d3, f3), (s4, d4, f4) = _DILATED_STAGES[output_stride]
        self.layer1 = self._make_layer(64, layers[0], 1, 1, 1, is_first=False)
        self.layer2 = self._make_layer(128, layers[1], 2, 1, 1)
        self.layer3 = self._make_layer(256, layers[2], s3, d3, f3)
        self.layer4 = self._make_layer(512, layers[3], s4, d4, f4)
        self.feature_channels = [64 * Bottleneck.expansion * 2**i for i in range(4)]
        self.feature_strides = [4, 8, 8 * s3, 8 * s3 * s4]
        self.fc = nn.Linear(self.feature_channels[-1], num_classes) if num_classes > 0 else None
        del self._block_args

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if zero_init_last:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    m.zero_init_last()

    def _make_layer(self, planes: int, blocks: int, stride: int, dilation: int, first_dilation: int,
                    is_first: bool = True) -> nn.Sequential:
        out_channels = planes * Bottleneck.expansion
        downsample = None
        if stride != 1 or self.inplanes != out_channels:
            # avg-down shortcut (ResNet-D): the pool carries the stride so the 1x1 conv sees every pixel.
            pool = (nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False)
                    if stride > 1 else nn.Identity())
            norm_layer = self._block_args["norm_layer"]
            downsample = nn.Sequential(pool, nn.Conv2d(self.inplanes, out_channels, 1, bias=False),
                                       norm_layer(out_channels))
        blocks_list = [Bottleneck(self.inplanes, planes, stride, first_dilation, downsample,
                                  is_first=is_first, **self._block_args)]
        self.inplanes = out_channels
        blocks_list += [Bottleneck(self.inplanes, planes, 1, dilation, **self._block_args)
                        for _ in range(1, blocks)]
        return nn.Sequential(*blocks_list)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the stem and each block in backward instead of keeping their activations
        (only while gradients are computed): the memory of a training forward drops to the
        blocks' inputs, for one more forward per step (see :mod:`segkit.models.checkpointing`).
        Takes precedence over :meth:`set_selective_recompute`."""
        self.grad_checkpointing = enable

    def set_selective_recompute(self, enable: bool = True) -> None:
        """Keep only the convolutions' outputs of the stem and each block for backward, and
        recompute the BatchNorm, ReLU, pooling and attention outputs between them there (see
        :mod:`segkit.models.checkpointing`): the same gradients, about a quarter less memory."""
        self.selective_recompute = enable

    @property
    def recompute_mode(self) -> str:
        return "full" if self.grad_checkpointing else "selective" if self.selective_recompute else "none"

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        mode = self.recompute_mode
        x = recomputed(self._stem, x, mode=mode, state=(self.conv1, self.bn1))
        features = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            # Block by block: recomputing a whole stage would bring all of its activations back at
            # once in backward (23 blocks in ResNeSt-101's third stage).
            for block in layer:
                if mode == "selective":
                    # bn3, the shortcut and the last ReLU stay outside: their input and output are
                    # kept anyway (conv3's output, the block's input and output), so recomputing
                    # them would save nothing.
                    x = block.merge(recomputed(block.branch, x, mode=mode, state=(block,)), x)
                else:
                    x = recomputed(block, x, mode=mode)
            features.append(x)
        return features

    def forward_head(self, c4: torch.Tensor) -> torch.Tensor:
        """ImageNet classifier on the last stage output (only when built with ``num_classes > 0``)."""
        if self.fc is None:
            raise RuntimeError("this backbone was built without a classifier (num_classes=0)")
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(c4, 1), 1))


BACKBONES: dict[str, Callable[..., ResNeSt]] = {}


def register_backbone(fn: Callable[..., ResNeSt]) -> Callable[..., ResNeSt]:
    BACKBONES[fn.__name__] = fn
    return fn


def create_backbone(name: str, **kwargs) -> ResNeSt:
    """Build a backbone by name; ``kwargs`` go to :class:`ResNeSt` (output_stride, norm_layer, ...)."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; valid choices: {', '.join(BACKBONES)}")
    return BACKBONES[name](**kwargs)


# The paper's family: radix 2, cardinality 1, width 64; deep stem 32 up to -50, 64 beyond.
@register_backbone
def resnest14(**kwargs) -> ResNeSt:
    """ResNeSt-14 (blocks 1-1-1-1, as GluonCV/timm's resnest14d)."""
    return ResNeSt((1, 1, 1, 1), **kwargs)


@register_backbone
def resnest26(**kwargs) -> ResNeSt:
    """ResNeSt-26 (blocks 2-2-2-2, as GluonCV/timm's resnest26d)."""
    return ResNeSt((2, 2, 2, 2), **kwargs)


@register_backbone
def resnest50(**kwargs) -> ResNeSt:
    """ResNeSt-50 (paper Table 2; timm's resnest50d)."""
    return ResNeSt((3, 4, 6, 3), **kwargs)


@register_backbone
def resnest101(**kwargs) -> ResNeSt:
    """ResNeSt-101 (stem 64; timm's resnest101e)."""
    return ResNeSt((3, 4, 23, 3), stem_width=64, **kwargs)


@register_backbone
def resnest200(**kwargs) -> ResNeSt:
    """ResNeSt-200 (stem 64; timm's resnest200e)."""
    return ResNeSt((3, 24, 36, 3), stem_width=64, **kwargs)


@register_backbone
def resnest269(**kwargs) -> ResNeSt:
    """ResNeSt-269 (stem 64; timm's resnest269e)."""
    return ResNeSt((3, 30, 48, 8), stem_width=64, **kwargs)


# Paper Table 1 (right): radix x cardinality x width at ResNet-50 cost, in the "fast" setting
# (avd pool before the 3x3 conv), e.g. 2s2x40d = radix 2, cardinality 2, width 40.
@register_backbone
def resnest50_fast_1s1x64d(**kwargs) -> ResNeSt:
    """Table 1 ablation: radix 1 (SE-like attention per cardinal group)."""
    return ResNeSt((3, 4, 6, 3), radix=1, avd_first=True, **kwargs)


@register_backbone
def resnest50_fast_2s1x64d(**kwargs) -> ResNeSt:
    """Table 1 ablation: ResNeSt-50-fast."""
    return ResNeSt((3, 4, 6, 3), radix=2, avd_first=True, **kwargs)


@register_backbone
def resnest50_fast_4s1x64d(**kwargs) -> ResNeSt:
    """Table 1 ablation: radix 4."""
    return ResNeSt((3, 4, 6, 3), radix=4, avd_first=True, **kwargs)


@register_backbone
def resnest50_fast_2s2x40d(**kwargs) -> ResNeSt:
    """Table 1 ablation: radix 2, cardinality 2, width 40."""
    return ResNeSt((3, 4, 6, 3), radix=2, cardinality=2, bottleneck_width=40, avd_first=True, **kwargs)


# ResNet-D baselines (Table 1's 0s1x64d): plain bottleneck with the stride in its 3x3 conv, the same
# deep stem of width 32 and avg-down shortcut; architecture and keys of timm's resnet50d/resnet101d.
@register_backbone
def resnet50d(**kwargs) -> ResNeSt:
    """ResNet-50-D."""
    return ResNeSt((3, 4, 6, 3), radix=0, avd=False, **kwargs)


@register_backbone
def resnet101d(**kwargs) -> ResNeSt:
    """ResNet-101-D."""
    return ResNeSt((3, 4, 23, 3), radix=0, avd=False, **kwargs)
