"""Training loss: cross-entropy on the main and auxiliary logits, plus optional smp losses.

The model output is ``{"out": logits}`` with ``"aux"`` added while training (segkit's Segmentor), or
a plain logits tensor (e.g. an smp model). Logits smaller than the target (segkit's Segmentor trains
at its heads' resolution) are upsampled to it bilinearly here, inside the cross-entropy, which keeps
the small logits for backward and upsamples them again there, rather than keeping full-resolution
150-class logits per head. Pixels labelled ``ignore_index`` contribute nothing; a crop made only of
them gives a loss of 0 with zero gradients, where ``F.cross_entropy`` returns NaN.

Class imbalance:

* ``class_weights``: one weight per class; the cross-entropy of both heads becomes the weighted mean
  ``sum_i w[y_i] * nll_i / sum_i w[y_i]`` over the pixels not ignored (``F.cross_entropy(weight=w)``
  with ``reduction="mean"``). The weights can be computed once from the training masks with
  :func:`class_frequencies` and :func:`balance_weights` (or :func:`auto_class_weights`, which also
  caches them as JSON).
* ``ohem``: online hard example mining on the main head (:func:`ohem_cross_entropy`).
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from segkit.errors import ConfigError
from segkit.models.maps import class_softmax
from segkit.models.segmentor import resize_logits

if TYPE_CHECKING:
    from segkit.data.base import SegmentationDataset


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


class _PixelCrossEntropy(torch.autograd.Function):
    """``-log softmax(resize(logits))[target]`` per pixel (B x H x W; 0 where ``target`` is
    ``ignore_index``), computed in float32 for bf16/fp16 logits (as autocast runs ``F.cross_entropy``);
    ``resize`` is :func:`resize_logits` to the target's size (nothing when the sizes match).

    ``F.cross_entropy`` keeps its float32 log-probabilities for backward: at 150 classes and full
    resolution that is the largest single activation of a training step, and under bf16 autocast
    twice the size of the bf16 logits it came from. Backward needs only ``softmax(resize(logits))``,
    so this keeps the logits as they came (bf16 under autocast, at the model's resolution) and one
    log-sum-exp per pixel, and resizes them again in backward.
    """

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, target: torch.Tensor, ignore_index: int,
                align_corners: bool) -> torch.Tensor:
        valid = target != ignore_index
        index = target.masked_fill(~valid, 0).unsqueeze(1)
        with torch.autocast(logits.device.type, enabled=False):
            x = resize_logits(logits, target.shape[-2:], align_corners)
            x = x.to(torch.promote_types(x.dtype, torch.float32))
            picked = x.gather(1, index)
            log_p = class_softmax(x, log=True).gather(1, index)
        ctx.save_for_backward(logits, (picked - log_p).squeeze(1), target)
        ctx.ignore_index, ctx.align_corners = ignore_index, align_corners
        return torch.where(valid, -log_p.squeeze(1), 0.0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        logits, lse, target = ctx.saved_tensors
        valid = target != ctx.ignore_index
        index = target.masked_fill(~valid, 0).unsqueeze(1)
        # The forward's resize again (as it ran: without autocast), recorded to take the gradient back.
        with torch.enable_grad(), torch.autocast(logits.device.type, enabled=False):
            small = logits.detach().requires_grad_()
            resized = resize_logits(small, target.shape[-2:], ctx.align_corners)
        # The softmax in place, unless ``resized`` is the saved logits themselves (sizes equal).
        probs = resized.detach().to(lse.dtype, copy=resized is small).sub_(lse.unsqueeze(1)).exp_()
        probs.scatter_add_(1, index, torch.full(index.shape, -1.0, dtype=probs.dtype, device=probs.device))
        probs.mul_(torch.where(valid, grad, 0.0).unsqueeze(1))
        probs = probs.to(resized.dtype)
        if resized is small:
            return probs, None, None, None
        return torch.autograd.grad(resized, small, probs)[0], None, None, None


def pixel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = 255,
                        align_corners: bool = True) -> torch.Tensor:
    """Per-pixel cross-entropy (B x H x W, at least float32), 0 on pixels labelled ``ignore_index``:
    the values of ``F.cross_entropy(reduction="none")`` on the logits resized bilinearly to the
    target's size (with ``align_corners``) when they are smaller, with less kept for backward (see
    :class:`_PixelCrossEntropy`)."""
    return _PixelCrossEntropy.apply(logits, target, ignore_index, align_corners)


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = 255,
                  weight: torch.Tensor | None = None, align_corners: bool = True) -> torch.Tensor:
    """Mean cross-entropy over the pixels not labelled ``ignore_index``; 0 when there are none.
    Logits smaller than ``target`` are resized to it first (see :func:`pixel_cross_entropy`).

    With ``weight`` (one per class) it is the weighted mean ``sum w[y] * nll / sum w[y]``, as
    ``F.cross_entropy(weight=weight, reduction="mean")``.
    """
    nll = pixel_cross_entropy(logits, target, ignore_index, align_corners)
    if weight is None:
        # The mean of F.cross_entropy divides by this count (0 -> NaN); clamping keeps an all-ignored
        # batch at 0 without a host sync.
        return nll.sum() / (target != ignore_index).sum().clamp(min=1)
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
              ignore_index: int = 255, align_corners: bool = True) -> torch.Tensor:
    """The pixels :func:`ohem_cross_entropy` keeps, as a boolean tensor shaped like ``target``."""
    with torch.no_grad():
        logits = resize_logits(logits, target.shape[-2:], align_corners)
        nll = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none")
        return _ohem_keep(nll, target != ignore_index, thresh, min_kept)


def ohem_cross_entropy(logits: torch.Tensor, target: torch.Tensor, thresh: float, min_kept: int,
                       ignore_index: int = 255, weight: torch.Tensor | None = None,
                       align_corners: bool = True) -> torch.Tensor:
    """Cross-entropy over the hard pixels of the batch (online hard example mining).

    With ``p`` the predicted probability of a pixel's true class, among the pixels not labelled
    ``ignore_index``: the pixels with ``p < thresh`` are kept; when they are fewer than ``min_kept``,
    the ``min_kept`` lowest-``p`` pixels are kept instead (all valid pixels when there are fewer than
    ``min_kept``; pixels tied with the ``min_kept``-th lowest are all kept). That is, keep
    ``p < max(thresh, p_(min_kept))`` up to ties, as PSPNet/HRNet's ``OhemCrossEntropy`` and
    mmsegmentation's ``OHEMPixelSampler``. ``min_kept`` counts pixels of the whole batch, as HRNet's
    (mmseg multiplies it by the batch size). With fewer valid pixels than ``min_kept`` all of them are
    kept, where both references drop the easiest one(s) unless they are below ``thresh``.

    The loss is the mean over the kept pixels, weighted by ``weight`` like :func:`cross_entropy`:
    ``sum_kept w[y] * nll / sum_kept w[y]``; 0 when nothing is kept. The selection is not
    differentiated through. It uses only this batch: under DistributedDataParallel each rank selects
    among its own pixels (as mmseg does), and DDP averages the per-rank gradients. Logits smaller than
    ``target`` are resized to it first (see :func:`pixel_cross_entropy`).
    """
    nll = pixel_cross_entropy(logits, target, ignore_index, align_corners)
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
    :func:`cross_entropy`); their count is checked against ``num_classes`` when given, and against
    the logits at every forward. ``ohem`` (:class:`Ohem` or ``{thresh, min_kept}``) replaces the main
    head's cross-entropy by :func:`ohem_cross_entropy`; the auxiliary head keeps the plain (weighted)
    cross-entropy, as mmsegmentation's OHEM configs (the sampler is set on the decode head only).
    The extra smp losses get neither.

    Logits smaller than the target are resized to it bilinearly with ``align_corners`` (the
    model's setting): inside the cross-entropy (see :func:`pixel_cross_entropy`), and once more for
    the extra losses, which take full-resolution logits.
    """

    class_weights: torch.Tensor | None

    def __init__(self, aux_weight: float = 0.2, ignore_index: int = 255,
                 extra: Sequence[Mapping[str, Any]] | None = None,
                 class_weights: Sequence[float] | None = None,
                 ohem: Ohem | Mapping[str, Any] | None = None,
                 num_classes: int | None = None, align_corners: bool = True) -> None:
        super().__init__()
        if aux_weight < 0:
            raise LossConfigError(f"aux_weight must be >= 0, got {aux_weight!r}")
        self.aux_weight = aux_weight
        self.ignore_index = ignore_index
        self.align_corners = align_corners
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
            ce = cross_entropy(logits, target, self.ignore_index, weight, self.align_corners)
        else:
            ce = ohem_cross_entropy(logits, target, self.ohem.thresh, self.ohem.min_kept,
                                    self.ignore_index, weight, self.align_corners)
        parts = {"ce": ce}
        total = parts["ce"]
        if "aux" in outputs:
            parts["aux"] = cross_entropy(outputs["aux"], target, self.ignore_index, weight, self.align_corners)
            total = total + self.aux_weight * parts["aux"]
        if self.extra:
            logits = resize_logits(logits, target.shape[-2:], self.align_corners)
            # smp's focal loss is NaN and its Lovasz loss not even a scalar when every pixel is
            # ignored; those batches get 0 here. (These losses sync with the host anyway.)
            has_valid = bool((target != self.ignore_index).any())
            for name, loss_fn in self.extra.items():
                parts[name] = loss_fn(logits, target) if has_valid else logits.sum() * 0.0
                total = total + self.extra_weights[name] * parts[name]
        return total, {name: value.detach() for name, value in parts.items()}


def build_loss(cfg: Mapping[str, Any] | None = None, *, auto_weights: Sequence[float] | None = None,
               num_classes: int | None = None, align_corners: bool = True) -> SegmentationLoss:
    """Build :class:`SegmentationLoss` from a config mapping.

    Keys: aux_weight, ignore_index, extra, ohem (null or ``{thresh, min_kept}``), class_weights
    (null, a list with one weight per class, or ``auto``) and balance (``median_frequency`` or
    ``inverse_log``: how ``auto`` weights are computed). ``class_weights: auto`` takes the weights
    from ``auto_weights``, which the caller computes from the training set (see
    :func:`auto_class_weights` with ``cfg["balance"]``). ``num_classes`` checks the weights' count.
    ``align_corners`` is the model's (a model setting, not a loss key): how logits smaller than the
    target, as a training-mode Segmentor returns them, are upsampled.
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
    return SegmentationLoss(**cfg, num_classes=num_classes, align_corners=align_corners)


# --- Class weights from the training masks ------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ClassFrequencies:
    """Label statistics of a set of masks (ignored pixels are not counted anywhere).

    ``pixels[c]``: pixels of class c; ``image_pixels[c]``: labelled pixels of the images that contain
    class c; ``images[c]``: number of images that contain c; ``num_images``: masks counted.
    """

    pixels: np.ndarray
    image_pixels: np.ndarray
    images: np.ndarray
    num_images: int

    @property
    def num_classes(self) -> int:
        return len(self.pixels)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ClassFrequencies) and self.to_dict() == other.to_dict()

    def to_dict(self) -> dict[str, Any]:
        return {"pixels": self.pixels.tolist(), "image_pixels": self.image_pixels.tolist(),
                "images": self.images.tolist(), "num_images": int(self.num_images)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ClassFrequencies:
        arrays = [np.asarray(data[key], dtype=np.int64) for key in ("pixels", "image_pixels", "images")]
        if len({a.shape for a in arrays}) != 1 or arrays[0].ndim != 1:
            raise ValueError("pixels, image_pixels and images must be lists of the same length")
        return cls(*arrays, num_images=int(data["num_images"]))


def mask_statistics(mask: np.ndarray, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """Pixel count per class (int64, ``num_classes`` long) of one train-id mask; ``ignore_index``
    pixels are skipped and any other value >= ``num_classes`` is a ValueError."""
    counts = np.bincount(np.asarray(mask, dtype=np.uint8).ravel(), minlength=256)
    counts[ignore_index] = 0
    bad = np.flatnonzero(counts[num_classes:]) + num_classes
    if bad.size:
        raise ValueError(f"mask values {bad.tolist()} are neither a class (0..{num_classes - 1}) "
                         f"nor ignore ({ignore_index})")
    return counts[:num_classes].astype(np.int64)


class _MaskCounts(torch.utils.data.Dataset):
    """Per-image class pixel counts of a dataset's masks, for a DataLoader's workers."""

    def __init__(self, dataset: SegmentationDataset, num_classes: int) -> None:
        self.dataset, self.num_classes = dataset, num_classes

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> np.ndarray | None:
        _, mask = self.dataset.load(i)
        if mask is None:
            return None
        try:
            return mask_statistics(mask, self.num_classes, self.dataset.ignore_index)
        except ValueError as e:
            raise ValueError(f"mask of image {self.dataset.name(i)!r}: {e}") from None


def _identity(item: Any) -> Any:
    return item


def class_frequencies(dataset: SegmentationDataset, num_classes: int | None = None, *,
                      num_workers: int = 0, progress: bool = False) -> ClassFrequencies:
    """Count the class pixels of every mask of ``dataset`` once (``dataset.load(i)``: the full masks,
    no augmentation). Unlabelled images count for nothing. ``num_workers > 0`` reads the masks in
    DataLoader worker processes."""
    num_classes = dataset.num_classes if num_classes is None else num_classes
    counts = _MaskCounts(dataset, num_classes)
    if num_workers > 0:
        items = torch.utils.data.DataLoader(counts, batch_size=None, num_workers=num_workers,
                                            collate_fn=_identity)
    else:
        items = (counts[i] for i in range(len(counts)))
    if progress:
        from tqdm import tqdm
        items = tqdm(items, total=len(counts), unit="mask", desc="class frequencies")
    pixels = np.zeros(num_classes, np.int64)
    image_pixels = np.zeros(num_classes, np.int64)
    images = np.zeros(num_classes, np.int64)
    num_images = 0
    for image_counts in items:
        if image_counts is None:
            continue
        num_images += 1
        present = image_counts > 0
        pixels += image_counts
        image_pixels += present * image_counts.sum()
        images += present
    return ClassFrequencies(pixels, image_pixels, images, num_images)


def balance_weights(counts: ClassFrequencies, method: str = "median_frequency", *,
                    k: float = 1.02) -> np.ndarray:
    """Class weights (float64, one per class) from mask statistics.

    ``median_frequency`` (Eigen & Fergus, 2015, as used by SegNet): ``freq_c = pixels of c / pixels
    of the images where c is present`` (labelled pixels: ignored ones are not counted) and
    ``w_c = median(freq) / freq_c``, the median taken over the classes present (numpy's median: the
    mean of the two middle values for an even count). A class that never occurs has no frequency;
    it gets weight 1, the weight of the median class (it never appears in a target of this training
    set, so the value only matters if the data changes).

    ``inverse_log`` (ENet, Paszke et al., 2016): ``w_c = 1 / ln(k + p_c)`` with ``p_c = pixels of c /
    all labelled pixels`` and ``k = 1.02`` (weights between 1/ln(1 + k) ~ 1.43 and 1/ln(k) ~ 50.5;
    a class that never occurs gets the largest).

    Classes that never occur are reported with a warning.
    """
    if method not in BALANCE_METHODS:
        raise LossConfigError(f"unknown balance method {method!r}; valid choices: {', '.join(BALANCE_METHODS)}")
    if counts.pixels.sum() == 0:
        raise LossConfigError(f"cannot compute class weights: the {counts.num_images} masks have no "
                              f"labelled pixels")
    present = counts.pixels > 0
    if not present.all():
        warnings.warn(f"classes {np.flatnonzero(~present).tolist()} never occur in the training masks",
                      stacklevel=2)
    if method == "median_frequency":
        freq = np.divide(counts.pixels, counts.image_pixels, out=np.zeros(counts.num_classes),
                         where=present)
        median = np.median(freq[present])
        return np.divide(median, freq, out=np.ones(counts.num_classes), where=present)
    if not k > 1:
        raise LossConfigError(f"inverse_log needs k > 1, got {k!r}")
    share = counts.pixels / counts.pixels.sum()
    return 1.0 / np.log(k + share)


_WEIGHTS_FORMAT = "segkit-class-weights"


def save_class_weights(path: str | Path, weights: Sequence[float], *, method: str | None = None,
                       frequencies: ClassFrequencies | None = None,
                       classes: Sequence[str] | None = None) -> None:
    """Write class weights (and how they were made) as JSON, atomically (temp file + rename)."""
    path = Path(path)
    record: dict[str, Any] = {"format": _WEIGHTS_FORMAT, "version": 1, "method": method,
                              "num_classes": len(weights), "weights": [float(w) for w in weights]}
    if classes is not None:
        record["classes"] = list(classes)
    if frequencies is not None:
        record["frequencies"] = frequencies.to_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_class_weights(path: str | Path, *, num_classes: int | None = None,
                       method: str | None = None) -> list[float]:
    """Class weights written by :func:`save_class_weights`; ``num_classes`` / ``method``, when given,
    must match the file (a stale cache is an error naming the file, never silently used)."""
    path = Path(path)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LossConfigError(f"{path}: cannot read class weights ({e})") from None
    if not isinstance(record, dict) or record.get("format") != _WEIGHTS_FORMAT:
        raise LossConfigError(f"{path}: not a class weights file (written by segkit.training.losses.save_class_weights)")
    try:
        weights = check_class_weights(record.get("weights"), num_classes)
    except LossConfigError as e:
        raise LossConfigError(f"{path}: {e}; delete it to compute the weights again") from None
    if method is not None and record.get("method") != method:
        raise LossConfigError(f"{path}: weights were computed with {record.get('method')!r}, not {method!r}; "
                              f"delete it to compute them again")
    return weights


def auto_class_weights(dataset: SegmentationDataset, method: str = "median_frequency", *,
                       cache: str | Path | None = None, num_workers: int = 0,
                       progress: bool = False) -> list[float]:
    """Class weights from ``dataset``'s masks (:func:`class_frequencies` + :func:`balance_weights`).

    With ``cache``: an existing file is loaded instead (checked against the dataset's class count
    and ``method``), otherwise the weights are computed and written there. Deterministic, so every
    DDP rank may compute them, or rank 0 computes and the others load the file after a barrier.
    """
    if method not in BALANCE_METHODS:
        raise LossConfigError(f"unknown balance method {method!r}; valid choices: {', '.join(BALANCE_METHODS)}")
    if cache is not None and Path(cache).is_file():
        return load_class_weights(cache, num_classes=dataset.num_classes, method=method)
    frequencies = class_frequencies(dataset, num_workers=num_workers, progress=progress)
    weights = balance_weights(frequencies, method).tolist()
    if cache is not None:
        save_class_weights(cache, weights, method=method, frequencies=frequencies, classes=dataset.classes)
    return weights
