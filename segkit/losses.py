"""Training loss: cross-entropy on the main and auxiliary logits, plus optional smp losses.

The model output is ``{"out": logits}`` with ``"aux"`` added while training (segkit's Segmentor), or
a plain logits tensor (e.g. an smp model). Pixels labelled ``ignore_index`` contribute nothing; a
crop made only of them gives a loss of 0 with zero gradients, where ``F.cross_entropy`` returns NaN.

Class imbalance:

* ``class_weights``: one weight per class; the cross-entropy of both heads becomes the weighted mean
  ``sum_i w[y_i] * nll_i / sum_i w[y_i]`` over the pixels not ignored (``F.cross_entropy(weight=w)``
  with ``reduction="mean"``). The weights can be computed once from the training masks with
  :func:`class_frequencies` and :func:`balance_weights` (or :func:`auto_class_weights`, which also
  caches them as JSON).
* ``ohem``: online hard example mining on the main head (:func:`ohem_cross_entropy`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segkit.errors import ConfigError


class LossConfigError(ConfigError, ValueError):
    """A bad loss option: a :class:`ConfigError` for the command-line tools (message, exit 2) and a
    ``ValueError`` for library callers."""


def _smp_loss(class_name: str) -> Callable[..., nn.Module]:
    def build(ignore_index: int, **kwargs: Any) -> nn.Module:
        # smp is an optional dependency (extra "smp"): imported only when such a loss is configured.
        try:
            import segmentation_models_pytorch.losses as smp_losses
        except ImportError as e:
            raise LossConfigError(f"extra loss {class_name} needs segmentation-models-pytorch: "
                              "pip install 'segkit[smp]'") from e
        return getattr(smp_losses, class_name)(mode="multiclass", ignore_index=ignore_index, **kwargs)

    return build


# smp losses with a multi-class mode and an ignore index, applied to the main logits.
EXTRA_LOSSES: dict[str, Callable[..., nn.Module]] = {
    "dice": _smp_loss("DiceLoss"),
    "lovasz": _smp_loss("LovaszLoss"),
    "focal": _smp_loss("FocalLoss"),
}
LOSS_KEYS = ("aux_weight", "ignore_index", "extra", "class_weights", "balance", "ohem")
BALANCE_METHODS = ("median_frequency", "inverse_log")


def _safe_ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """``numerator / denominator``, and 0 (with zero gradients) where the denominator is 0: then the
    numerator is a sum of zero-weighted terms. No host sync."""
    return numerator / torch.where(denominator > 0, denominator, torch.ones_like(denominator))


def _pixel_weights(target: torch.Tensor, valid: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``weight[target]`` per pixel, 0 on ignored pixels."""
    return weight[target.masked_fill(~valid, 0)] * valid


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = 255,
                  weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy over the pixels not labelled ``ignore_index``; 0 when there are none.

    With ``weight`` (one per class) it is the weighted mean ``sum w[y] * nll / sum w[y]``, as
    ``F.cross_entropy(weight=weight, reduction="mean")``.
    """
    if weight is None:
        total = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum")
        # The mean of F.cross_entropy divides by this count (0 -> NaN); clamping keeps an all-ignored
        # batch at 0 without a host sync.
        return total / (target != ignore_index).sum().clamp(min=1)
    nll = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none")
    pixel_weight = _pixel_weights(target, target != ignore_index, weight)
    return _safe_ratio((nll * pixel_weight).sum(), pixel_weight.sum())


def _ohem_keep(nll: torch.Tensor, valid: torch.Tensor, thresh: float, min_kept: int) -> torch.Tensor:
    """The OHEM selection from per-pixel NLL (detached): see :func:`ohem_cross_entropy`."""
    # p = softmax(logits)[y] = exp(-nll). Ignored pixels get 2, above every probability, so the
    # k-th smallest over the whole batch is the k-th smallest valid one when there are k valid
    # pixels, and 2 (keep every valid pixel) when there are fewer: no host sync on the count.
    prob = torch.where(valid, torch.exp(-nll.float()), torch.full_like(nll, 2.0, dtype=torch.float32))
    flat = prob.reshape(-1)
    kth = torch.kthvalue(flat, min(min_kept, flat.numel())).values
    return valid & ((prob < thresh) | (prob <= kth))


def ohem_mask(logits: torch.Tensor, target: torch.Tensor, thresh: float, min_kept: int,
              ignore_index: int = 255) -> torch.Tensor:
    """The pixels :func:`ohem_cross_entropy` keeps, as a boolean tensor shaped like ``target``."""
    with torch.no_grad():
        nll = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none")
        return _ohem_keep(nll, target != ignore_index, thresh, min_kept)


def ohem_cross_entropy(logits: torch.Tensor, target: torch.Tensor, thresh: float, min_kept: int,
                       ignore_index: int = 255, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy over the hard pixels of the batch (online hard example mining).

    With ``p`` the predicted probability of a pixel's true class, among the pixels not labelled
    ``ignore_index``: the pixels with ``p < thresh`` are kept; when they are fewer than ``min_kept``,
    the ``min_kept`` lowest-``p`` pixels are kept instead (all valid pixels when there are fewer than
    ``min_kept``; pixels tied with the ``min_kept``-th lowest are all kept). That is, keep
    ``p < max(thresh, p_(min_kept))`` up to ties, as PSPNet/HRNet's ``OhemCrossEntropy`` and
    mmsegmentation's ``OHEMPixelSampler``. Two deliberate differences: ``min_kept`` counts pixels of
    the whole batch (HRNet; mmseg multiplies it by the batch size), and with fewer valid pixels than
    ``min_kept`` all of them are kept (both references then drop the easiest one).

    The loss is the mean over the kept pixels, weighted by ``weight`` like :func:`cross_entropy`:
    ``sum_kept w[y] * nll / sum_kept w[y]``; 0 when nothing is kept. The selection is not
    differentiated through. It uses only this batch: under DistributedDataParallel each rank selects
    among its own pixels (as mmseg does), and DDP averages the per-rank gradients.
    """
    nll = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none")
    valid = target != ignore_index
    keep = _ohem_keep(nll.detach(), valid, thresh, min_kept)
    pixel_weight = keep.float() if weight is None else _pixel_weights(target, keep, weight)
    return _safe_ratio((nll * pixel_weight).sum(), pixel_weight.sum())


@dataclass(frozen=True)
class Ohem:
    """OHEM options (see :func:`ohem_cross_entropy`): keep pixels whose true-class probability is
    below ``thresh`` (0 < thresh <= 1), and at least the ``min_kept`` hardest pixels per batch."""

    thresh: float = 0.7
    min_kept: int = 100_000

    def __post_init__(self) -> None:
        thresh, min_kept = self.thresh, self.min_kept
        if isinstance(thresh, bool) or not isinstance(thresh, (int, float)) or not 0 < thresh <= 1:
            raise LossConfigError(f"ohem.thresh must be a probability in (0, 1], got {thresh!r}")
        if (isinstance(min_kept, bool) or not isinstance(min_kept, (int, float))
                or not float(min_kept).is_integer() or min_kept < 1):
            raise LossConfigError(f"ohem.min_kept must be an integer >= 1, got {min_kept!r}")
        object.__setattr__(self, "thresh", float(thresh))
        object.__setattr__(self, "min_kept", int(min_kept))

    @classmethod
    def from_config(cls, value: Ohem | Mapping[str, Any] | None) -> Ohem | None:
        """None, an :class:`Ohem`, or a mapping ``{thresh, min_kept}`` (missing keys: defaults)."""
        if value is None or isinstance(value, Ohem):
            return value
        if not isinstance(value, Mapping):
            raise LossConfigError(f"ohem must be null or a mapping like {{thresh: 0.7, min_kept: 100000}}, "
                                  f"got {value!r}")
        unknown = sorted(set(value) - {"thresh", "min_kept"})
        if unknown:
            raise LossConfigError(f"unknown ohem option(s) {unknown}; valid choices: thresh, min_kept")
        return cls(**dict(value))


def check_class_weights(values: Any, num_classes: int | None = None) -> list[float]:
    """``values`` as a list of floats: finite, >= 0, not all 0, and ``num_classes`` long if given."""
    if isinstance(values, (str, bytes, Mapping)) or not hasattr(values, "__iter__"):
        raise LossConfigError(f"class_weights must be null or a list of one number per class, got {values!r}")
    try:
        weights = [float(v) for v in values]
    except (TypeError, ValueError):
        raise LossConfigError(f"class_weights must be numbers, got {list(values)!r}") from None
    if not weights or not all(math.isfinite(w) and w >= 0 for w in weights) or not any(weights):
        raise LossConfigError(f"class_weights must be finite numbers >= 0, not all 0, got {weights}")
    if num_classes is not None and len(weights) != num_classes:
        raise LossConfigError(f"class_weights has {len(weights)} entries but there are {num_classes} "
                              f"classes; give one weight per class")
    return weights


class SegmentationLoss(nn.Module):
    """``ce(out) + aux_weight * ce(aux) + sum(weight * extra(out))``.

    ``extra`` is a list of ``{"name": dice | lovasz | focal, "weight": float}``; further keys are
    passed to the smp loss (e.g. ``gamma`` for focal). ``forward`` returns the total and its
    unweighted parts, detached for logging (``ce``, ``aux`` when given, then the extra names).

    ``class_weights`` (one per class) weight the cross-entropy of both heads (a weighted mean, see
    :func:`cross_entropy`); their count is checked against ``num_classes`` when given, else against
    the logits at every forward. ``ohem`` (:class:`Ohem` or ``{thresh, min_kept}``) replaces the main
    head's cross-entropy by :func:`ohem_cross_entropy`; the auxiliary head keeps the plain (weighted)
    cross-entropy, as mmsegmentation's OHEM configs (the sampler is set on the decode head only).
    The extra smp losses get neither.
    """

    class_weights: torch.Tensor | None

    def __init__(self, aux_weight: float = 0.2, ignore_index: int = 255,
                 extra: Sequence[Mapping[str, Any]] | None = None,
                 class_weights: Sequence[float] | None = None,
                 ohem: Ohem | Mapping[str, Any] | None = None,
                 num_classes: int | None = None) -> None:
        super().__init__()
        if aux_weight < 0:
            raise LossConfigError(f"aux_weight must be >= 0, got {aux_weight!r}")
        self.aux_weight = aux_weight
        self.ignore_index = ignore_index
        weights = None if class_weights is None else check_class_weights(class_weights, num_classes)
        # Not persistent: the weights come from the config (or its cache), not from a loss state.
        self.register_buffer("class_weights", None if weights is None else torch.tensor(weights),
                             persistent=False)
        self._weights_by_device: dict[torch.device, torch.Tensor] = {}
        self.ohem = Ohem.from_config(ohem)
        self.extra = nn.ModuleDict()
        self.extra_weights: dict[str, float] = {}
        for entry in extra or ():
            if not isinstance(entry, Mapping):
                raise LossConfigError(f"an extra loss is a mapping like {{name: dice, weight: 0.5}}, got {entry!r}")
            params = dict(entry)
            name = params.pop("name", None)
            weight = params.pop("weight", 1.0)
            if name not in EXTRA_LOSSES:
                raise LossConfigError(f"unknown extra loss {name!r}; valid choices: {', '.join(EXTRA_LOSSES)}")
            if name in self.extra:
                raise LossConfigError(f"extra loss {name!r} is listed twice")
            if weight < 0:
                raise LossConfigError(f"weight of extra loss {name!r} must be >= 0, got {weight!r}")
            try:
                self.extra[name] = EXTRA_LOSSES[name](ignore_index, **params)
            except TypeError as e:
                raise LossConfigError(f"extra loss {name!r}: bad options {sorted(params)} ({e})") from e
            self.extra_weights[name] = float(weight)

    def _class_weights_for(self, logits: torch.Tensor) -> torch.Tensor | None:
        """The class weights on the logits' device (copied once per device), checked against them."""
        weights = self.class_weights
        if weights is None:
            return None
        if logits.shape[1] != weights.numel():
            raise LossConfigError(f"class_weights has {weights.numel()} entries but the logits have "
                                  f"{logits.shape[1]} classes; give one weight per class")
        if weights.device != logits.device:
            if logits.device not in self._weights_by_device:
                self._weights_by_device[logits.device] = weights.to(logits.device)
            weights = self._weights_by_device[logits.device]
        return weights

    def forward(self, outputs: torch.Tensor | Mapping[str, torch.Tensor],
                target: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if isinstance(outputs, torch.Tensor):
            outputs = {"out": outputs}
        logits = outputs["out"]
        weight = self._class_weights_for(logits)
        if self.ohem is None:
            ce = cross_entropy(logits, target, self.ignore_index, weight)
        else:
            ce = ohem_cross_entropy(logits, target, self.ohem.thresh, self.ohem.min_kept,
                                    self.ignore_index, weight)
        parts = {"ce": ce}
        total = parts["ce"]
        if "aux" in outputs:
            parts["aux"] = cross_entropy(outputs["aux"], target, self.ignore_index, weight)
            total = total + self.aux_weight * parts["aux"]
        if self.extra:
            # smp's focal loss is NaN and its Lovasz loss not even a scalar when every pixel is
            # ignored; those batches get 0 here. (These losses sync with the host anyway.)
            has_valid = bool((target != self.ignore_index).any())
            for name, loss_fn in self.extra.items():
                parts[name] = loss_fn(logits, target) if has_valid else logits.sum() * 0.0
                total = total + self.extra_weights[name] * parts[name]
        return total, {name: value.detach() for name, value in parts.items()}


def build_loss(cfg: Mapping[str, Any] | None = None, *, auto_weights: Sequence[float] | None = None,
               num_classes: int | None = None) -> SegmentationLoss:
    """Build :class:`SegmentationLoss` from a config mapping.

    Keys: aux_weight, ignore_index, extra, ohem (null or ``{thresh, min_kept}``), class_weights
    (null, a list with one weight per class, or ``auto``) and balance (``median_frequency`` or
    ``inverse_log``: how ``auto`` weights are computed). ``class_weights: auto`` takes the weights
    from ``auto_weights``, which the caller computes from the training set (see
    :func:`auto_class_weights` with ``cfg["balance"]``). ``num_classes`` checks the weights' count.
    """
    cfg = dict(cfg or {})
    unknown = sorted(set(cfg) - set(LOSS_KEYS))
    if unknown:
        raise LossConfigError(f"unknown loss option(s) {unknown}; valid choices: {', '.join(LOSS_KEYS)}")
    balance = cfg.pop("balance", None)
    if balance is not None and balance not in BALANCE_METHODS:
        raise LossConfigError(f"unknown balance method {balance!r}; valid choices: {', '.join(BALANCE_METHODS)}")
    if isinstance(cfg.get("class_weights"), str):
        if cfg["class_weights"] != "auto":
            raise LossConfigError(f"class_weights must be null, a list of one weight per class, or auto; "
                                  f"got {cfg['class_weights']!r}")
        if auto_weights is None:
            raise LossConfigError("class_weights=auto needs the weights computed from the training masks: "
                                  "pass build_loss(cfg, auto_weights=auto_class_weights(train_set, balance))")
        cfg["class_weights"] = auto_weights
    return SegmentationLoss(**cfg, num_classes=num_classes)
