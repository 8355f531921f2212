"""The ResNeSt family as segmentation-models-pytorch encoders (optional dependency: extra ``smp``).

Importing this module registers every backbone of :data:`segkit.models.resnest.BACKBONES` as the smp
encoder ``segkit_<backbone>``, so that smp's decoders can be put on it::

    import segmentation_models_pytorch as smp
    import segkit.models.smp_encoder  # noqa: F401  (registers the encoders)

    model = smp.DeepLabV3Plus(encoder_name="segkit_resnest50", encoder_weights="imagenet", classes=19)

What smp (0.6.0) expects of an encoder, and where segkit departs from its defaults:

- Registry: ``smp.encoders.encoders[name] = {"encoder": cls, "params": {...},
  "pretrained_settings": {...}}``; smp builds ``cls(**params, depth=depth, output_stride=stride)``.
- Features: ``forward`` returns ``depth + 1`` maps: the input itself, then strides 2, 4, 8, 16, 32
  (capped by ``output_stride``). Here: input, stem (2x stem width), ``c1 .. c4``. ``out_channels``
  lists their channels; stages past ``depth`` are not built.
- Weights: smp downloads any ``encoder_weights`` other than None from the Hugging Face hub. segkit's
  weights are not there, so :func:`register_smp_encoders` also routes ``segkit_*`` names in smp's
  ``get_encoder`` to this module, where ``encoder_weights`` goes to
  :func:`segkit.models.pretrained.load_pretrained`: None (random init), ``"imagenet"`` (the
  original release), a local file or an http(s) URL. Other names still reach smp's own function.
- Dilation: see :meth:`SegkitEncoder.make_dilated`.
"""
from __future__ import annotations

import functools
import os
import sys
from typing import Any, Callable

import torch
from torch import nn

try:
    import segmentation_models_pytorch.encoders as smp_encoders
    from segmentation_models_pytorch.encoders._base import EncoderMixin
except ImportError as e:
    raise ImportError("segkit.models.smp_encoder needs segmentation-models-pytorch: "
                      "pip install 'segkit[smp]'") from e

from segkit.models.pretrained import load_pretrained
from segkit.models.resnest import BACKBONES, create_backbone

PREFIX = "segkit_"
DEPTHS = (1, 2, 3, 4, 5)


class SegkitEncoder(nn.Module, EncoderMixin):
    """A segkit backbone with smp's encoder interface.

    The backbone's modules are adopted under their own names (``conv1``, ``bn1``, ``layer1`` ...), so
    the encoder's state dict has the backbone's keys and a segkit backbone checkpoint loads into it.
    ``backbone_kwargs`` go to :func:`create_backbone` (e.g. ``norm_layer``, ``zero_init_last``); smp
    passes a model's extra keyword arguments on to its encoder.
    """

    # The attention's batch-of-one BatchNorm path checks a private torch class, which TorchScript
    # cannot resolve; tracing and torch.export work.
    _is_torch_scriptable = False

    def __init__(self, name: str, depth: int = 5, output_stride: int = 32,
                 weights: str | os.PathLike | None = None, **backbone_kwargs: Any) -> None:
        if depth not in DEPTHS:
            raise ValueError(f"encoder depth must be one of {DEPTHS}, got {depth!r}")
        super().__init__()
        backbone = create_backbone(name, output_stride=output_stride, **backbone_kwargs)
        # Weights load into the whole backbone (strict keys) before stages past ``depth`` are dropped.
        load_pretrained(backbone, weights, name)
        self.conv1, self.bn1, self.relu = backbone.conv1, backbone.bn1, backbone.relu
        if depth >= 2:
            self.maxpool = backbone.maxpool
        for i in range(1, depth):
            self.add_module(f"layer{i}", getattr(backbone, f"layer{i}"))
        self._depth = depth
        self._in_channels = 3
        self._output_stride = output_stride
        self._out_channels = [3, backbone.conv1[-1].out_channels, *backbone.feature_channels]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = [x]
        x = self.relu(self.bn1(self.conv1(x)))
        features.append(x)
        if self._depth >= 2:
            x = self.maxpool(x)
        for i in range(1, self._depth):
            x = getattr(self, f"layer{i}")(x)
            features.append(x)
        return features

    def make_dilated(self, output_stride: int) -> None:
        """Check that the encoder was built for ``output_stride``; it is never dilated afterwards.

        smp's generic version turns the strides of the Conv2d layers of the stages past
        ``output_stride`` into dilation. That does not fit this backbone: its strides sit in average
        pools (the avd pool and the avg-down shortcut), and the original ResNeSt code dilates a stage's
        first block by half the rate. The encoder is therefore built with the requested
        ``output_stride`` (smp passes it to the constructor), and this hook, which smp calls right
        after, only confirms it.
        """
        if output_stride != self._output_stride:
            raise ValueError(f"this encoder was built with output_stride {self._output_stride}; build a "
                              f"new one for output_stride {output_stride!r} (valid choices: 8, 16, 32)")


def encoder_names() -> list[str]:
    """The smp encoder names of segkit's backbones."""
    return [PREFIX + name for name in BACKBONES]


def create_encoder(name: str, in_channels: int = 3, depth: int = 5,
                   weights: str | os.PathLike | None = None, output_stride: int = 32,
                   **backbone_kwargs: Any) -> SegkitEncoder:
    """Build encoder ``name`` (``segkit_<backbone>``) as smp's ``get_encoder`` would, weights included."""
    if name not in encoder_names():
        raise ValueError(f"unknown segkit encoder {name!r}; valid choices: {', '.join(encoder_names())}")
    encoder = SegkitEncoder(name[len(PREFIX):], depth, output_stride, weights, **backbone_kwargs)
    # After the weights, so that smp can adapt pretrained stem filters to other channel counts.
    encoder.set_in_channels(in_channels, pretrained=weights is not None)
    return encoder


def _route_segkit_names(smp_get_encoder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    @functools.wraps(smp_get_encoder)
    def get_encoder(name: str, in_channels: int = 3, depth: int = 5, weights: Any = None,
                    output_stride: int = 32, **kwargs: Any) -> nn.Module:
        if name.startswith(PREFIX):
            return create_encoder(name, in_channels, depth, weights, output_stride, **kwargs)
        return smp_get_encoder(name, in_channels, depth, weights, output_stride, **kwargs)

    get_encoder.routes_segkit_names = True
    return get_encoder


def register_smp_encoders() -> None:
    """Register ``segkit_<backbone>`` for every backbone in smp's encoder registry (idempotent).

    Besides the registry entries (which give smp's listing and a weights-free build), smp's
    ``get_encoder`` is wrapped to route ``segkit_*`` names to :func:`create_encoder`, so that
    ``encoder_weights`` reaches segkit's loader rather than the Hugging Face hub. smp's model
    modules import ``get_encoder`` by name, so the wrapper replaces it in every loaded smp module that
    holds smp's function.
    """
    for name in BACKBONES:
        # No pretrained_settings: smp would look them up on the Hugging Face hub.
        smp_encoders.encoders[PREFIX + name] = {"encoder": SegkitEncoder, "pretrained_settings": {},
                                                "params": {"name": name}}
    smp_get_encoder = smp_encoders.get_encoder
    if getattr(smp_get_encoder, "routes_segkit_names", False):
        return
    routed = _route_segkit_names(smp_get_encoder)
    for module_name, module in list(sys.modules.items()):
        if (module_name.split(".")[0] == "segmentation_models_pytorch"
                and getattr(module, "get_encoder", None) is smp_get_encoder):
            module.get_encoder = routed


register_smp_encoders()
