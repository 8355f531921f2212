"""Dataset-level segmentation metrics from a confusion matrix accumulated on the device.

Intersections and unions are summed over the whole dataset before dividing (as the ADE20K devkit,
the Cityscapes evaluator and the original PyTorch-Encoding code do), never averaged per image.

Two mIoU conventions are in use and differ whenever a class has an empty union (no ground-truth
and no predicted pixel), which happens on small subsets or rare classes:

* ``"all"``: mean over all classes, an empty union counting 0 (ADE20K devkit, PyTorch-Encoding,
  i.e. the paper's ADE20K numbers);
* ``"present"``: mean over classes with a non-empty union (mmsegmentation, torchmetrics
  ``average="macro"``, the Cityscapes evaluator).

Both are always computed; ``convention`` only selects which one is reported as ``"mIoU"``.
"""

import math
from collections.abc import Sequence
from typing import Any

import torch

from segkit import distributed
from segkit.errors import ConfigError, DataError

CONVENTIONS = ("all", "present")


def check_convention(convention: str) -> None:
    """Raise ConfigError unless ``convention`` is one of :data:`CONVENTIONS`."""
    if convention not in CONVENTIONS:
        raise ConfigError(f"mIoU convention must be one of {CONVENTIONS}, got {convention!r}")


class ConfusionMatrix:
    """``num_classes`` x ``num_classes`` counts, rows = ground truth, columns = prediction.

    The counts live in one flat int64 buffer on ``device`` with three extra bins: pixels whose
    target is ``ignore_index``, pixels whose target is outside ``[0, num_classes)`` (and not
    ``ignore_index``), and pixels whose prediction is outside ``[0, num_classes)`` (wherever the
    target, ignored or not: a prediction must always be a class). Sorting every pixel into a bin
    with ``torch.where`` lets a single ``torch.bincount`` per batch do all the work without boolean
    indexing (which would synchronise with the host), and one all-reduce of the buffer merges every
    rank's counts. :meth:`compute` raises if either invalid bin is non-empty, naming the culprit.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255,
                 device: torch.device | str = "cpu") -> None:
        if num_classes < 1:
            raise ConfigError(f"num_classes must be at least 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.counts = torch.zeros(num_classes * num_classes + 3, dtype=torch.int64, device=device)

    @property
    def mat(self) -> torch.Tensor:
        n = self.num_classes
        return self.counts[: n * n].view(n, n)

    @property
    def ignored(self) -> int:
        """Pixels whose target was ``ignore_index`` (and whose prediction was a class)."""
        return int(self.counts[-3])

    @property
    def invalid_targets(self) -> int:
        """Pixels whose target was neither a class nor ``ignore_index`` (prediction a class)."""
        return int(self.counts[-2])

    @property
    def invalid_predictions(self) -> int:
        """Pixels whose prediction was not a class, whatever their target."""
        return int(self.counts[-1])

    @property
    def invalid(self) -> int:
        """Pixels whose target or prediction was neither a class nor ``ignore_index``."""
        return self.invalid_targets + self.invalid_predictions

    def reset(self) -> None:
        self.counts.zero_()

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Add a batch of integer label maps of any (equal) shape; returns the batch's own counts
        (the flat buffer's layout: :func:`image_stats` reads an image's numbers from them)."""
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape "
                             f"{tuple(target.shape)}")
        n = self.num_classes
        device = self.counts.device
        pred = pred.to(device, torch.int64, non_blocking=True).flatten()
        target = target.to(device, torch.int64, non_blocking=True).flatten()
        bins = torch.where((target >= 0) & (target < n), target * n + pred, n * n + 1)
        bins = torch.where(target == self.ignore_index, n * n, bins)
        bins = torch.where((pred >= 0) & (pred < n), bins, n * n + 2)
        counts = torch.bincount(bins, minlength=n * n + 3)
        self.counts += counts
        return counts

    def reduce_from_all_processes(self) -> None:
        """Sum the counts over all ranks (collective: call it once, on every rank)."""
        distributed.all_reduce(self.counts)

    def compute(self, convention: str = "present") -> dict[str, Any]:
        """Metrics as Python floats in [0, 1] (per-class lists hold NaN where undefined).

        Keys: ``pixAcc``; ``IoU`` and ``acc`` per class; ``mIoU`` (per ``convention``),
        ``mIoU_all``, ``mIoU_present``; ``mAcc`` (mean accuracy over classes with labelled pixels,
        as mmsegmentation); ``fwIoU`` (IoU weighted by ground-truth frequency); ``present`` (per
        class: non-empty union); ``convention``; ``labelled_pixels``, ``ignored_pixels``;
        ``confusion``, the counts (rows truth, columns prediction) as lists of ints.
        With no labelled pixel at all pixAcc is 0.0, as the original code reports it (correct /
        (eps + labelled)), and mAcc, fwIoU and mIoU_present are NaN (means over no class).

        Raises ValueError if a prediction was outside ``[0, num_classes)`` (the model or whatever
        made the predictions is at fault) and DataError if a target was neither a class nor
        ``ignore_index`` (the masks are).
        """
        check_convention(convention)
        if self.invalid_predictions:
            raise ValueError(
                f"{self.invalid_predictions} pixels have a predicted class outside "
                f"[0, {self.num_classes}); predictions must be class indices of the "
                f"{self.num_classes}-class model")
        if self.invalid_targets:
            raise DataError(
                f"{self.invalid_targets} pixels have a label outside [0, {self.num_classes}) that is "
                f"not ignore_index={self.ignore_index}; masks must hold train ids")
        mat = self.mat.double().cpu()
        tp = mat.diag()
        gt = mat.sum(1)
        union = gt + mat.sum(0) - tp
        total = gt.sum()
        present = union > 0
        iou = tp / union  # NaN where the union is empty
        acc = tp / gt
        labelled = gt > 0
        mean_present = iou[present].mean() if present.any() else torch.tensor(math.nan)
        result = {
            "pixAcc": (tp.sum() / total).item() if total > 0 else 0.0,
            "mIoU_all": (iou.nan_to_num(0.0).sum() / self.num_classes).item(),
            "mIoU_present": mean_present.item(),
            "mAcc": acc[labelled].mean().item() if labelled.any() else math.nan,
            "fwIoU": ((gt[labelled] / total) * iou[labelled]).sum().item()
            if labelled.any() else math.nan,
            "IoU": iou.tolist(),
            "acc": acc.tolist(),
            "present": present.tolist(),
            "convention": convention,
            "labelled_pixels": int(total.item()),
            "ignored_pixels": self.ignored,
            "confusion": self.mat.cpu().tolist(),
        }
        result["mIoU"] = result[f"mIoU_{convention}"]
        return result


def image_stats(counts: torch.Tensor, num_classes: int) -> dict[str, Any]:
    """One image's numbers from its counts (what :meth:`ConfusionMatrix.update` returned for it).

    ``labelled`` pixels; ``pixAcc``; ``mIoU`` over the classes present in its truth or its
    prediction (labelled pixels only); ``classes``, those class ids; ``worst``, the present class
    of lowest IoU (the lowest id among equals), and ``worst_IoU``. Without a labelled pixel
    pixAcc, mIoU, worst and worst_IoU are None.
    """
    n = num_classes
    mat = counts[: n * n].view(n, n).cpu().double()
    tp = mat.diag()
    gt = mat.sum(1)
    union = gt + mat.sum(0) - tp
    labelled = int(gt.sum().item())
    if labelled == 0:
        return {"labelled": 0, "pixAcc": None, "mIoU": None, "classes": [], "worst": None, "worst_IoU": None}
    present = torch.nonzero(union > 0).flatten()
    iou = tp[present] / union[present]
    worst = int(torch.argmin(iou).item())  # the first minimum: the lowest class id among equals
    return {"labelled": labelled, "pixAcc": (tp.sum() / labelled).item(), "mIoU": iou.mean().item(),
            "classes": present.tolist(), "worst": int(present[worst].item()), "worst_IoU": iou[worst].item()}


def _pct(value: float) -> str:
    return "-" if math.isnan(value) else f"{100 * value:.2f}"


def format_table(result: dict[str, Any], class_names: Sequence[str]) -> str:
    """Per-class IoU / accuracy table (percent) followed by the summary metrics.

    ``-`` marks an undefined value: IoU of a class with an empty union (which the ``"all"``
    convention counts as 0), accuracy of a class without labelled pixels.
    """
    if len(class_names) != len(result["IoU"]):
        raise ValueError(f"{len(class_names)} class names for {len(result['IoU'])} classes")
    width = max(len("class"), *(len(name) for name in class_names))
    lines = [f"{'class':<{width}}  {'IoU':>6}  {'acc':>6}"]
    lines += [f"{name:<{width}}  {_pct(iou):>6}  {_pct(acc):>6}"
              for name, iou, acc in zip(class_names, result["IoU"], result["acc"])]
    other = "present" if result["convention"] == "all" else "all"
    lines += [
        "-" * (width + 16),
        f"pixAcc {_pct(result['pixAcc'])}  mIoU {_pct(result['mIoU'])} "
        f"(mean over {result['convention']} classes; over {other}: "
        f"{_pct(result[f'mIoU_{other}'])})",
        f"mAcc {_pct(result['mAcc'])}  fwIoU {_pct(result['fwIoU'])}  "
        f"classes present {sum(result['present'])}/{len(class_names)}",
    ]
    return "\n".join(lines)
