"""Import of the published PyTorch-Encoding DeepLabV3-ResNeSt checkpoints (the paper's own models).

PyTorch-Encoding names the backbone ``pretrained.*``, the ASPP branches ``head.aspp.b0..b4`` (the
pooling branch as ``b4.gap.{1,2}`` after its pool), the fusion ``head.aspp.project``, the last
block and classifier ``head.block.{0,1,4}`` and the auxiliary FCN head ``auxlayer.conv5.{0,1,4}``.
"""
from __future__ import annotations

import re

import torch

# (PyTorch-Encoding pattern, segkit replacement), applied to the first that matches.
_RULES: list[tuple[re.Pattern[str], str]] = [(re.compile(p), r) for p, r in [
    (r"^pretrained\.", "backbone."),
    (r"^head\.aspp\.b([0-3])\.([01])\.", r"head.aspp.branches.\1.\2."),
    (r"^head\.aspp\.b4\.gap\.1\.", "head.aspp.branches.4.conv."),
    (r"^head\.aspp\.b4\.gap\.2\.", "head.aspp.branches.4.norm."),
    (r"^head\.aspp\.project\.([01])\.", r"head.aspp.project.0.\1."),
    (r"^head\.block\.([01])\.", r"head.block.0.\1."),
    (r"^head\.block\.4\.", "head.classifier."),
    (r"^auxlayer\.conv5\.([01])\.", r"aux_head.block.0.\1."),
    (r"^auxlayer\.conv5\.4\.", "aux_head.classifier."),
]]


def is_encoding_state_dict(state: dict[str, torch.Tensor]) -> bool:
    return any(k.startswith("pretrained.") for k in state) and any(k.startswith("head.aspp.b0.") for k in state)


def convert_encoding_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a PyTorch-Encoding DeepLabV3 state dict to segkit's :class:`Segmentor` keys.

    The backbone's ImageNet classifier (``pretrained.fc``), unused by segmentation, is dropped;
    keys no rule knows are kept as they are, so a strict load reports them.
    """
    out = {}
    for key, value in state.items():
        if key.startswith("pretrained.fc."):
            continue
        for pattern, replacement in _RULES:
            new, hits = pattern.subn(replacement, key)
            if hits:
                key = new
                break
        out[key] = value
    return out
