"""A network made ready for inference: weights restored from a checkpoint, BatchNorm folded,
channels_last, optionally cast to bf16 and compiled, as :class:`~segkit.inference.options.InferenceOptions`
say."""
from __future__ import annotations

import torch
from torch import nn

from segkit.checkpoints.checkpoint import ModelCheckpoint, restore_model
from segkit.inference.options import InferenceOptions, torch_dtype
from segkit.models.bn_fold import fold_batchnorm
from segkit.models.segmentor import build_segmentor
from segkit.settings import BackboneSettings, ModelSettings


class _CastInput(nn.Module):
    """``model`` with its parameters in ``dtype``, taking float32 input (cast on entry)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.model = model.to(dtype)
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model(x.to(self.dtype))


def prepare_model(model: nn.Module, device: torch.device | str,
                  options: InferenceOptions = InferenceOptions()) -> nn.Module:
    """``model`` (changed in place) set up for evaluation only: on ``device`` in eval mode, BatchNorm
    folded into the convs (``options.fold_bn``), NHWC memory format (``options.channels_last``),
    optionally in ``options.dtype`` and ``torch.compile``d (``options.compile``).

    Folding and channels_last give the same outputs up to float rounding; on CPU (oneDNN) they make
    a forward faster (bench/NOTES.md). ``dtype`` (``"bf16"``) runs the model in that dtype end
    to end: the weights are cast once, after folding (the folded scales are computed in float32),
    the input on entry, and the logits stay in ``dtype`` until the caller's final float32
    (:func:`~segkit.inference.multiscale.predict_single`,
    :func:`~segkit.inference.multiscale.predict_multiscale`). Unlike autocast, no weight is cast per
    call and every layer runs in ``dtype``, softmax and upsampling included. ``compile`` uses
    inductor with frozen weights (constant-folded and, on CPU, pre-packed for oneDNN): the first
    forward of each input shape compiles, so it pays off on long evaluations. The model must not be
    trained afterwards.
    """
    model.to(device).eval()
    if options.fold_bn:
        example = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
        fold_batchnorm(model, example.to(device))
    model.to(memory_format=torch.channels_last if options.channels_last else torch.contiguous_format)
    dtype = torch_dtype(options.dtype, "model")
    if dtype is not None:
        model = _CastInput(model, dtype)
    return torch.compile(model, options={"freezing": True}) if options.compile else model


def load_network(ckpt: ModelCheckpoint, backbone: BackboneSettings, model: ModelSettings, num_classes: int,
                 device: torch.device, options: InferenceOptions = InferenceOptions()) -> nn.Module:
    """The segmentor ``backbone`` and ``model`` describe, with ``ckpt``'s weights, prepared for
    inference on ``device`` (:func:`prepare_model`)."""
    net = build_segmentor(backbone, model, num_classes, load_weights=False)
    restore_model(net, ckpt.state, ckpt.path, ckpt.config, backbone.name, num_classes)
    return prepare_model(net, device, options)
