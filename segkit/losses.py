"""Training loss: cross-entropy on the main and auxiliary logits, plus optional smp losses.

The model output is ``{"out": logits}`` with ``"aux"`` added while training (segkit's Segmentor), or
a plain logits tensor (e.g. an smp model). Pixels labelled ``ignore_index`` contribute nothing; a
crop made only of them gives a loss of 0 with zero gradients, where ``F.cross_entropy`` returns NaN.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segkit.errors import ConfigError


def _smp_loss(class_name: str) -> Callable[..., nn.Module]:
    def build(ignore_index: int, **kwargs: Any) -> nn.Module:
        # smp is an optional dependency (extra "smp"): imported only when such a loss is configured.
        try:
            import segmentation_models_pytorch.losses as smp_losses
        except ImportError as e:
            raise ConfigError(f"extra loss {class_name} needs segmentation-models-pytorch: "
                              "pip install 'segkit[smp]'") from e
        return getattr(smp_losses, class_name)(mode="multiclass", ignore_index=ignore_index, **kwargs)

    return build


# smp losses with a multi-class mode and an ignore index, applied to the main logits.
EXTRA_LOSSES: dict[str, Callable[..., nn.Module]] = {
    "dice": _smp_loss("DiceLoss"),
    "lovasz": _smp_loss("LovaszLoss"),
    "focal": _smp_loss("FocalLoss"),
}
LOSS_KEYS = ("aux_weight", "ignore_index", "extra")


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Mean cross-entropy over the pixels not labelled ``ignore_index``; 0 when there are none."""
    total = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum")
    # The mean of F.cross_entropy divides by this count (0 -> NaN); clamping keeps an all-ignored
    # batch at 0 without a host sync.
    return total / (target != ignore_index).sum().clamp(min=1)


class SegmentationLoss(nn.Module):
    """``ce(out) + aux_weight * ce(aux) + sum(weight * extra(out))``.

    ``extra`` is a list of ``{"name": dice | lovasz | focal, "weight": float}``; further keys are
    passed to the smp loss (e.g. ``gamma`` for focal). ``forward`` returns the total and its
    unweighted parts, detached for logging (``ce``, ``aux`` when given, then the extra names).
    """

    def __init__(self, aux_weight: float = 0.2, ignore_index: int = 255,
                 extra: Sequence[Mapping[str, Any]] | None = None) -> None:
        super().__init__()
        if aux_weight < 0:
            raise ConfigError(f"aux_weight must be >= 0, got {aux_weight!r}")
        self.aux_weight = aux_weight
        self.ignore_index = ignore_index
        self.extra = nn.ModuleDict()
        self.extra_weights: dict[str, float] = {}
        for entry in extra or ():
            if not isinstance(entry, Mapping):
                raise ConfigError(f"an extra loss is a mapping like {{name: dice, weight: 0.5}}, got {entry!r}")
            params = dict(entry)
            name = params.pop("name", None)
            weight = params.pop("weight", 1.0)
            if name not in EXTRA_LOSSES:
                raise ConfigError(f"unknown extra loss {name!r}; valid choices: {', '.join(EXTRA_LOSSES)}")
            if name in self.extra:
                raise ConfigError(f"extra loss {name!r} is listed twice")
            if weight < 0:
                raise ConfigError(f"weight of extra loss {name!r} must be >= 0, got {weight!r}")
            try:
                self.extra[name] = EXTRA_LOSSES[name](ignore_index, **params)
            except TypeError as e:
                raise ConfigError(f"extra loss {name!r}: bad options {sorted(params)} ({e})") from e
            self.extra_weights[name] = float(weight)

    def forward(self, outputs: torch.Tensor | Mapping[str, torch.Tensor],
                target: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if isinstance(outputs, torch.Tensor):
            outputs = {"out": outputs}
        logits = outputs["out"]
        parts = {"ce": cross_entropy(logits, target, self.ignore_index)}
        total = parts["ce"]
        if "aux" in outputs:
            parts["aux"] = cross_entropy(outputs["aux"], target, self.ignore_index)
            total = total + self.aux_weight * parts["aux"]
        if self.extra:
            # smp's focal loss is NaN and its Lovasz loss not even a scalar when every pixel is
            # ignored; those batches get 0 here. (These losses sync with the host anyway.)
            has_valid = bool((target != self.ignore_index).any())
            for name, loss_fn in self.extra.items():
                parts[name] = loss_fn(logits, target) if has_valid else logits.sum() * 0.0
                total = total + self.extra_weights[name] * parts[name]
        return total, {name: value.detach() for name, value in parts.items()}


def build_loss(cfg: Mapping[str, Any] | None = None) -> SegmentationLoss:
    """Build :class:`SegmentationLoss` from a config mapping (keys: aux_weight, ignore_index, extra)."""
    cfg = dict(cfg or {})
    unknown = sorted(set(cfg) - set(LOSS_KEYS))
    if unknown:
        raise ConfigError(f"unknown loss option(s) {unknown}; valid choices: {', '.join(LOSS_KEYS)}")
    return SegmentationLoss(**cfg)
