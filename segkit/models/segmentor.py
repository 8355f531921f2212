"""A backbone of the ResNeSt family joined with the DeepLabV3 head (and the auxiliary FCN head)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segkit.models.checkpointing import recomputed
from segkit.models.heads import ASPP_RATES, DeepLabV3Head, FCNHead
from segkit.models.maps import recording_graph
from segkit.models.norm import get_norm_layer
from segkit.models.pretrained import load_pretrained
from segkit.models.resnest import ResNeSt, create_backbone

if TYPE_CHECKING:
    from segkit.settings import BackboneSettings, ModelSettings


def resize_logits(logits: torch.Tensor, size: Sequence[int], align_corners: bool) -> torch.Tensor:
    """``logits`` resized bilinearly to ``size`` (H, W), or as they are when already that size.

    On CPU, bf16 / fp16 logits are resized in float32 (the result is float32) and in channels_last:
    the CPU's bilinear kernels are several times slower in bf16 than in float32 and, for NCHW maps,
    slower again than for channels_last (forward and backward, bench/NOTES.md); evaluation and the
    cross-entropy take the full-size map to float32 anyway. The result then has its classes
    innermost: take the softmax over them with :func:`segkit.models.maps.class_softmax`. float32
    logits, GPUs and graph exports keep the NCHW resize, so float32 numbers do not change.
    """
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    half = logits.device.type == "cpu" and logits.dtype in (torch.bfloat16, torch.float16)
    if half and not recording_graph():
        logits = logits.to(torch.float32, memory_format=torch.channels_last)
    else:
        # NCHW whatever the model's memory format: the softmax over classes that follows
        # (F.softmax, F.cross_entropy) is several times slower on a channels_last tensor (CPU).
        logits = logits.contiguous().float() if half else logits.contiguous()
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=align_corners)


class Segmentor(nn.Module):
    """DeepLabV3 on a dilated backbone.

    In eval mode ``forward`` returns ``{"out": logits}`` at the input size, upsampled bilinearly
    with ``align_corners`` as configured (the original code uses True); on CPU a bf16 / fp16 model
    upsamples, and returns, them in float32. In training mode it
    returns the logits at the heads' resolution (the input size / output stride), ``"out"`` plus
    ``"aux"`` (the FCN head on c3): :class:`segkit.training.losses.SegmentationLoss` upsamples them to the
    target inside its cross-entropy, with the same ``align_corners``, so that no full-resolution
    logits are kept for backward.
    """

    def __init__(self, backbone: ResNeSt, num_classes: int, aux: bool = True, channels: int = 256,
                 aspp_dropout: float = 0.5, dropout: float = 0.1, aux_dropout: float = 0.1,
                 align_corners: bool = True, norm_layer=nn.BatchNorm2d) -> None:
        super().__init__()
        if backbone.output_stride not in ASPP_RATES:
            raise ValueError(f"DeepLabV3 needs a backbone output_stride of 8 or 16, got {backbone.output_stride}")
        self.backbone = backbone
        self.num_classes = num_classes
        self.align_corners = align_corners
        c3_channels, c4_channels = backbone.feature_channels[2:]
        self.head = DeepLabV3Head(c4_channels, num_classes, backbone.output_stride, norm_layer, channels,
                                  aspp_dropout, dropout)
        self.aux_head = FCNHead(c3_channels, num_classes, norm_layer, channels, aux_dropout) if aux else None

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing of the backbone (stem and every block) and of both heads: the
        same outputs, gradients and BatchNorm statistics, with the activations recomputed in
        backward instead of kept (see :mod:`segkit.models.checkpointing`). Takes precedence over
        :meth:`set_selective_recompute`."""
        self.backbone.set_grad_checkpointing(enable)

    def set_selective_recompute(self, enable: bool = True) -> None:
        """Selective recomputation in the backbone (stem and every block) and both heads: the
        convolutions' outputs are kept, the cheap operations between them recomputed in backward;
        the same outputs, gradients and BatchNorm statistics (see :mod:`segkit.models.checkpointing`)."""
        self.backbone.set_selective_recompute(enable)

    def _head(self, head: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return recomputed(head, x, mode=self.backbone.recompute_mode)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        _, _, c3, c4 = self.backbone(x)
        out = self._head(self.head, c4)
        if not self.training:
            return {"out": resize_logits(out, x.shape[-2:], self.align_corners)}
        if self.aux_head is None:
            return {"out": out}
        return {"out": out, "aux": self._head(self.aux_head, c3)}

    def head_parameters(self) -> list[nn.Parameter]:
        """Parameters of the randomly initialised heads (trained with a larger learning rate)."""
        heads = [self.head] + ([self.aux_head] if self.aux_head is not None else [])
        return [p for h in heads for p in h.parameters()]


def build_segmentor(backbone: BackboneSettings, model: ModelSettings, num_classes: int,
                    load_weights: bool = True) -> Segmentor:
    """Build the segmentor from the backbone and model settings.

    ``load_weights=False`` skips the ImageNet weights (when a segkit checkpoint follows anyway).
    """
    norm_layer = get_norm_layer(backbone.norm)
    net = create_backbone(backbone.name, output_stride=backbone.output_stride, norm_layer=norm_layer,
                          zero_init_last=backbone.zero_init_last)
    if load_weights:
        load_pretrained(net, backbone.pretrained, backbone.name)
    return Segmentor(net, num_classes, aux=model.aux, channels=model.channels, aspp_dropout=model.aspp_dropout,
                     dropout=model.dropout, aux_dropout=model.aux_dropout, align_corners=model.align_corners,
                     norm_layer=norm_layer)
