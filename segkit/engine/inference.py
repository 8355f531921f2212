"""Whole-image and multi-scale + flip inference, and dataset evaluation across ranks.

A model maps a normalised float batch B x 3 x H x W to ``{"out": logits B x C x H x W}``. The
functions here take images that are already normalised; :func:`evaluate` does the normalisation
itself because it reads raw uint8 images from the dataset.
"""

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from segkit import distributed
from segkit.errors import ConfigError
from segkit.data.preprocess import Preprocess
from segkit.metrics import ConfusionMatrix, check_convention
from segkit.models.bn_fold import fold_batchnorm

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
                   "fp16": torch.float16, "float16": torch.float16}

PadValue = float | Sequence[float]
#: a torch dtype or "bf16" / "fp16"; None runs in float32
AutocastDtype = torch.dtype | str | None
#: ``callback(index, image HxWx3 uint8, mask HxW uint8 or None, prediction HxW int64)``
ImageCallback = Callable[[int, np.ndarray, np.ndarray | None, np.ndarray], None]


class SegDataset(Protocol):
    """What :func:`evaluate` uses of a segkit dataset (masks: train ids, ignore_index elsewhere)."""

    num_classes: int
    ignore_index: int

    def __len__(self) -> int: ...

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray | None]: ...


def _dtype(value: AutocastDtype, what: str) -> torch.dtype | None:
    if not isinstance(value, str):
        return value
    if value not in AUTOCAST_DTYPES:
        raise ConfigError(f"{what} dtype must be one of {sorted(AUTOCAST_DTYPES)} or null, got {value!r}")
    return AUTOCAST_DTYPES[value]


def _autocast(device: torch.device, dtype: AutocastDtype) -> contextlib.AbstractContextManager:
    dtype = _dtype(dtype, "autocast")
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _pad(x: torch.Tensor, height: int, width: int, value: PadValue) -> torch.Tensor:
    """Pad ``x`` (... x 3 x h x w) at the bottom/right to ``height`` x ``width``.

    ``value`` is one number or one per channel: the normalised value of the pixel the training
    pipeline pads with, so that padded borders look as they did in training.
    """
    h, w = x.shape[-2:]
    if (h, w) == (height, width):
        return x
    fill = torch.as_tensor(value, dtype=x.dtype, device=x.device).reshape(-1, 1, 1)
    out = fill.expand(*x.shape[:-2], height, width).clone()
    out[..., :h, :w] = x
    return out


def _resize(x: torch.Tensor, size: tuple[int, int], align_corners: bool) -> torch.Tensor:
    """Bilinear resize of ``x`` (N x C x h x w) to ``size``; a no-op at the same size."""
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)


def _log_resize(log_x: torch.Tensor, size: tuple[int, int], align_corners: bool) -> torch.Tensor:
    """``log(_resize(exp(log_x)))`` for ``log_x`` C x h x w, computed without leaving log space.

    Bilinear interpolation is separable and each output pixel along an axis mixes at most two
    input pixels, ``w0 * v[i0] + w1 * v[i1]``; in log space that is
    ``logaddexp(log w0 + log_v[i0], log w1 + log_v[i1])``, which neither overflows nor underflows
    however large the values are. The weights are PyTorch's own: they are read off
    ``F.interpolate`` applied to an identity matrix, one axis at a time.
    """
    for dim, (length, target) in enumerate(zip(log_x.shape[-2:], size), start=1):
        if length == target:
            continue
        eye = torch.eye(length, dtype=torch.float32, device=log_x.device).view(1, length, length, 1)
        weights = F.interpolate(eye, size=(target, 1), mode="bilinear",
                                align_corners=align_corners)[0, :, :, 0].T  # target x length
        first = (weights > 0).to(torch.int8).argmax(1)  # each row is w0 at i0, w1 at i0 + 1
        second = (first + 1).clamp(max=length - 1)
        w0 = weights.gather(1, first[:, None])[:, 0]
        # At the last input pixel PyTorch puts both weights on it: w0 above already holds them.
        w1 = torch.where(second > first, weights.gather(1, second[:, None])[:, 0], 0.0)
        shape = [1, 1, 1]
        shape[dim] = target
        log_x = torch.logaddexp(log_x.index_select(dim, first) + w0.log().view(shape),
                                log_x.index_select(dim, second) + w1.log().view(shape))
    return log_x


def _forward(model: nn.Module, x: torch.Tensor, autocast: AutocastDtype) -> torch.Tensor:
    with _autocast(x.device, autocast):
        logits = model(x)["out"]
    if logits.shape[-2:] != x.shape[-2:]:
        raise ValueError(f"model returned logits of size {tuple(logits.shape[-2:])} for an input "
                         f"of size {tuple(x.shape[-2:])}; it must upsample to the input size")
    return logits.float()


@torch.inference_mode()
def predict_single(model: nn.Module, image: torch.Tensor, *, pad_multiple: int = 8,
                   pad_value: PadValue = 0.0, autocast: AutocastDtype = None,
                   argmax: bool = False) -> torch.Tensor:
    """Whole-image float32 logits C x H x W (B x C x H x W for a batch), or labels if ``argmax``.

    The image is padded at the bottom/right to a multiple of ``pad_multiple`` (the output stride)
    so that every feature cell covers whole input pixels, and the logits are cropped back.
    The model must be in eval mode.
    """
    batch = image if image.dim() == 4 else image[None]
    h, w = batch.shape[-2:]
    padded = _pad(batch, math.ceil(h / pad_multiple) * pad_multiple,
                  math.ceil(w / pad_multiple) * pad_multiple, pad_value)
    logits = _forward(model, padded, autocast)[..., :h, :w]
    out = logits.argmax(1) if argmax else logits
    return out if image.dim() == 4 else out[0]


#: Pixels per forward for ``max_batch="auto"`` on CPU: two ADE20K windows (480 x 480), the fastest
#: batch there on two cores; 120 x 120 windows go 8 at a time (bench/NOTES.md). GPUs take 8.
CPU_PIXELS_PER_BATCH = 2 * 480 * 480


def resolve_max_batch(max_batch: int | str, crop_size: int | None, device: torch.device | str) -> int:
    """Windows per forward: ``max_batch`` itself, or for ``"auto"`` 8 on a GPU and on CPU as many
    ``crop_size`` windows as fit :data:`CPU_PIXELS_PER_BATCH` (1 to 8): large batches of large
    windows run slower there than small ones. (No ``crop_size``, no windows: only validated.)"""
    if max_batch == "auto":
        if torch.device(device).type == "cpu" and crop_size is not None:
            return max(1, min(8, CPU_PIXELS_PER_BATCH // crop_size**2))
        return 8
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ConfigError(f"eval.max_batch must be a positive integer or 'auto', got {max_batch!r}")
    return max_batch


class _CastInput(nn.Module):
    """``model`` with its parameters in ``dtype``, taking float32 input (cast on entry)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.model = model.to(dtype)
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model(x.to(self.dtype))


def prepare_model(model: nn.Module, device: torch.device | str, *, channels_last: bool = True,
                  fold_bn: bool = True, dtype: AutocastDtype = None, compile: bool = False) -> nn.Module:
    """``model`` (changed in place) set up for evaluation only: on ``device`` in eval mode, BatchNorm
    folded into the convs, NHWC memory format, optionally in ``dtype`` and ``torch.compile``d.

    Folding and channels_last give the same outputs up to float rounding; on CPU (oneDNN) they make
    a forward ~17% faster (bench/NOTES.md). ``dtype`` (``"bf16"``) runs the model in that dtype end
    to end: the weights are cast once, after folding (the folded scales are computed in float32),
    the input on entry, and the logits stay in ``dtype`` until the caller's final float32
    (:func:`predict_single`, :func:`predict_multiscale`). Unlike autocast, no weight is cast per
    call and every layer runs in ``dtype``, softmax and upsampling included. ``compile`` uses
    inductor with frozen weights (constant-folded and, on CPU, pre-packed for oneDNN): the first
    forward of each input shape compiles (about a minute on two cores), so it pays off on long
    evaluations. The model must not be trained afterwards.
    """
    model.to(device).eval()
    if fold_bn:
        example = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
        fold_batchnorm(model, example.to(device))
    model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    dtype = _dtype(dtype, "model")
    if dtype is not None:
        model = _CastInput(model, dtype)
    return torch.compile(model, options={"freezing": True}) if compile else model


#: ``fusion`` choices of :func:`predict_multiscale`: how the views' outputs are combined.
FUSIONS = ("softmax", "original")
#: ``window_placement`` choices of :func:`predict_multiscale`: where the last window of a row or
#: column goes.
WINDOW_PLACEMENTS = ("border", "original")


def check_multiscale_options(fusion: str, window_placement: str) -> None:
    """Raise ValueError unless ``fusion`` is one of :data:`FUSIONS` and ``window_placement`` one
    of :data:`WINDOW_PLACEMENTS`."""
    if fusion not in FUSIONS:
        raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
    if window_placement not in WINDOW_PLACEMENTS:
        raise ValueError(f"window_placement must be one of {WINDOW_PLACEMENTS}, got {window_placement!r}")


def _windows(length: int, crop: int, stride: int, placement: str) -> list[tuple[int, int]]:
    """``(start, extent)`` of the windows along an axis of ``length >= crop`` pixels.

    There are as many as in the original code, ``ceil((length - crop) / stride) + 1``. With
    ``"original"`` window k starts at ``k * stride`` and ends at ``min(start + crop, length)``, so
    the last ones may be shorter than the crop (they are padded up to it for the forward). With
    ``"border"`` the last one is moved back to end at the border: every window is a full crop of
    the image and none runs into extra padding.
    """
    count = math.ceil((length - crop) / stride) + 1
    if placement == "border":
        return [(min(k * stride, length - crop), crop) for k in range(count)]
    return [(k * stride, min(crop, length - k * stride)) for k in range(count)]


#: A window of a :class:`_ScaleView`: top, left, height, width (height and width at most the crop).
Box = tuple[int, int, int, int]


class _ScaleView:
    """The image at one scale, padded to at least the crop, with its windows and what has been
    accumulated over them (allocated on first use, freed by :meth:`finish`).
    ``pending`` counts the window forwards (``copies`` per window: 2 with flip) still to add.

    With fusion ``"softmax"`` the accumulator sums probabilities; with ``"original"`` it holds
    ``log(sum over windows of exp(l + l_flipped))`` (logaddexp, so nothing overflows), and the
    first logits of a flip pair wait in ``half`` until the other copy arrives.
    """

    def __init__(self, image: torch.Tensor, size: tuple[int, int], crop: int, pad_value: PadValue,
                 copies: int, *, fusion: str, window_placement: str, align_corners: bool) -> None:
        self.size = size
        self.crop = crop
        self.pad_value = pad_value
        self.copies = copies
        self.fusion = fusion
        self.align_corners = align_corners
        self.image = _pad(_resize(image[None], size, align_corners)[0], max(size[0], crop),
                          max(size[1], crop), pad_value)
        height, width = self.image.shape[-2:]
        stride = int(crop * 2 / 3)
        self.boxes: list[Box] = [(y, x, hy, wx)
                                 for y, hy in _windows(height, crop, stride, window_placement)
                                 for x, wx in _windows(width, crop, stride, window_placement)]
        self.pending = len(self.boxes) * copies
        self.acc: torch.Tensor | None = None
        self.half: dict[Box, torch.Tensor] = {}

    def window(self, box: Box, mirrored: bool) -> torch.Tensor:
        """The crop x crop input of ``box``: a window that stops short of the crop (placement
        ``"original"``) is padded at the bottom/right first, then the whole is mirrored."""
        y, x, hy, wx = box
        win = _pad(self.image[:, y:y + hy, x:x + wx], self.crop, self.crop, self.pad_value)
        return win.flip(-1) if mirrored else win

    def add(self, out: torch.Tensor, box: Box, mirrored: bool) -> None:
        """Add one forward's output C x crop x crop for ``box``: probabilities for fusion
        ``"softmax"``, raw logits for ``"original"``. It is un-mirrored, then cropped to the box."""
        y, x, hy, wx = box
        out = (out.flip(-1) if mirrored else out)[:, :hy, :wx]
        self.pending -= 1
        if self.fusion == "original" and self.copies == 2:
            first = self.half.pop(box, None)
            if first is None:
                self.half[box] = out
                return
            out = first + out  # l + l_flipped
        if self.acc is None:
            fill = 0.0 if self.fusion == "softmax" else -math.inf
            self.acc = out.new_full((out.shape[0], *self.image.shape[-2:]), fill)
        region = self.acc[:, y:y + hy, x:x + wx]
        if self.fusion == "softmax":
            region += out
        else:
            region.copy_(torch.logaddexp(region, out))

    def finish(self, out_size: tuple[int, int]) -> torch.Tensor:
        """Overlaps averaged, padding cropped off, resized to ``out_size``: probabilities summed
        over the flips (fusion ``"softmax"``) or the log of the original's score map."""
        count = torch.zeros_like(self.acc[:1])
        for y, x, hy, wx in self.boxes:
            count[:, y:y + hy, x:x + wx] += 1
        h, w = self.size
        acc, self.acc = self.acc, None
        if self.fusion == "softmax":  # in place: the accumulator is this method's now
            return _resize(acc.div_(count)[None, :, :h, :w], out_size, self.align_corners)[0]
        return _log_resize(acc.sub_(count.log())[:, :h, :w], out_size, self.align_corners)


@torch.inference_mode()
def predict_multiscale(model: nn.Module, image: torch.Tensor, scales: Sequence[float], flip: bool,
                       base_size: int, crop_size: int, num_classes: int, *, max_batch: int = 8,
                       pad_value: PadValue = 0.0, autocast: AutocastDtype = None,
                       argmax: bool = False, align_corners: bool = True, fusion: str = "softmax",
                       window_placement: str = "border") -> torch.Tensor:
    """Multi-scale (+ flip) prediction for one normalised image 3 x H x W, as in the paper.

    For each scale the image is resized (bilinear, aspect kept) so that its long side is
    ``ceil(base_size * scale)`` (the short side ``int(short * long / long_side + 0.5)``) and
    padded at the bottom/right to at least ``crop_size`` with ``pad_value`` (pass the normalised
    value of a black pixel, ``-mean / std`` per channel, as the original does). Crop-size windows
    with stride ``int(crop_size * 2 / 3)``, ``ceil((padded - crop) / stride) + 1`` per axis, are
    run (a single one when the scaled image fits the crop) and overlaps averaged by count. With
    ``flip`` the mirrored windows are run too and un-mirrored. Each scale's map is cropped to the
    scaled image, resized back to H x W and the maps are summed over scales.

    Every window is crop x crop whatever the scale, so the windows of all scales and their
    mirrored copies are stacked into forwards of ``max_batch`` images: a few full batches instead
    of one small forward per window keep the device busy. Each scale's map lives only until its
    last window is done. The model must be in eval mode.

    Three choices have the original PyTorch-Encoding ``MultiEvalModule`` behaviour as an option:

    ``align_corners`` (default True, the original's): of both bilinear resizes, the image to each
    scale and each scale's map back to H x W.

    ``window_placement``: ``"border"`` (default) moves the last window of a row/column back so it
    ends at the image border, so every window is image content. ``"original"`` starts window k at
    ``k * stride`` and ends it at ``min(start + crop, padded)``; a window cut short is padded to
    the crop with ``pad_value`` for the forward and its output cropped back.

    ``fusion``: ``"softmax"`` (default) sums softmax probabilities of every view (scale and flip,
    windows averaged): a per-pixel offset of the logits changes nothing, every scale and flip weighs
    the same at every pixel (no single overconfident view dominates) and values stay bounded under
    fp16/bf16 autocast. It returns float32 probabilities C x H x W summing to
    ``len(scales) * (2 if flip else 1)`` per pixel (divide by that for a mean).
    ``"original"`` scores each scale with ``exp(l + l_flipped)`` (``exp(l)`` without flip; ``l``
    the window's logits, ``l_flipped`` the un-mirrored logits of the mirrored window), averages
    overlapping windows of those scores, resizes the map and sums over scales, as the original
    does; in float32 ``exp`` overflows for confident models. Here the whole chain runs in log
    space instead and it returns float32 ``log(sum of the original's scores)`` C x H x W, whose
    argmax (and softmax over classes) is the original's. It is exact up to float rounding: every
    step the original takes on the scores is a sum with non-negative weights (the count average,
    bilinear interpolation with at most two taps per axis, the sum over scales), and
    ``log(sum_i w_i exp(a_i)) = logaddexp_i(log w_i + a_i)`` holds pixel by pixel whatever the
    magnitudes, with no shift to choose or to keep constant across the pixels being mixed.

    Returns the C x H x W map above, or its argmax H x W when ``argmax``. Invalid ``fusion`` or
    ``window_placement`` values raise ValueError.
    """
    check_multiscale_options(fusion, window_placement)
    _, h, w = image.shape
    flips = (False, True) if flip else (False,)
    views = []
    for scale in scales:
        long_side = math.ceil(base_size * scale)
        short_side = max(1, int(min(h, w) * long_side / max(h, w) + 0.5))
        size = (long_side, short_side) if h > w else (short_side, long_side)
        views.append(_ScaleView(image, size, crop_size, pad_value, len(flips), fusion=fusion,
                                window_placement=window_placement, align_corners=align_corners))
    jobs = [(view, box, mirrored) for view in views for box in view.boxes for mirrored in flips]
    total: torch.Tensor | None = None  # the first finished view's map itself: one C x H x W less
    for start in range(0, len(jobs), max_batch):
        chunk = jobs[start:start + max_batch]
        batch = torch.stack([view.window(box, mirrored) for view, box, mirrored in chunk])
        out = _forward(model, batch, autocast)
        if fusion == "softmax":
            out = out.softmax(1)
        for scores, (view, box, mirrored) in zip(out, chunk):
            view.add(scores, box, mirrored)
            if view.pending == 0:
                done = view.finish((h, w))
                if total is None:
                    total = done
                elif fusion == "softmax":
                    total += done
                else:
                    total = torch.logaddexp(total, done)
    if total.shape[0] != num_classes:
        raise ValueError(f"the model returned {total.shape[0]} class scores, expected num_classes={num_classes}")
    return total.argmax(0) if argmax else total


@torch.inference_mode()
def predict_image(model: nn.Module, image: torch.Tensor, *, scales: Sequence[float] | None = None,
                  flip: bool = False, base_size: int | None = None, crop_size: int | None = None,
                  num_classes: int | None = None, pad_multiple: int = 8, pad_value: PadValue = 0.0,
                  max_batch: int = 8, autocast: AutocastDtype = None, align_corners: bool = True,
                  fusion: str = "softmax", window_placement: str = "border",
                  max_size: int | None = None) -> torch.Tensor:
    """Scores C x H x W of a normalised image 3 x H x W (B x C x H x W for a batch B x 3 x H x W,
    taken image by image with ``scales``) as :func:`evaluate` predicts: their argmax is its prediction.

    Without ``scales``: the whole image's logits (:func:`predict_single`), or with ``flip`` the
    softmax probabilities of the image and its mirror (one batch) summed. With ``scales``:
    :func:`predict_multiscale` (which needs ``base_size``, ``crop_size`` and ``num_classes``).
    Without ``scales``, an image whose long side exceeds ``max_size`` is covered at its own size by
    ``crop_size`` windows, so that the network's memory stays that of a window batch.
    :func:`probabilities` turns the scores into class probabilities.
    """
    if image.dim() == 4 and scales is not None:
        return torch.stack([predict_image(model, x, scales=scales, flip=flip, base_size=base_size,
                                          crop_size=crop_size, num_classes=num_classes, pad_value=pad_value,
                                          max_batch=max_batch, autocast=autocast, align_corners=align_corners,
                                          fusion=fusion, window_placement=window_placement) for x in image])
    if scales is not None:
        return predict_multiscale(model, image, scales, flip, base_size, crop_size, num_classes,
                                  max_batch=max_batch, pad_value=pad_value, autocast=autocast,
                                  align_corners=align_corners, fusion=fusion, window_placement=window_placement)
    if max_size is not None and max(image.shape[-2:]) > max_size:
        if image.dim() == 4:
            return torch.stack([predict_image(model, x, flip=flip, crop_size=crop_size, num_classes=num_classes,
                                              pad_value=pad_value, max_batch=max_batch, autocast=autocast,
                                              max_size=max_size) for x in image])
        scores = predict_multiscale(model, image, [1.0], flip, max(image.shape[-2:]), crop_size, num_classes,
                                    max_batch=max_batch, pad_value=pad_value, autocast=autocast)
        # Probabilities: summed over the flips as below; without flip their log stands for the
        # logits (its softmax is the probabilities themselves).
        return scores if flip else scores.log_()
    if not flip:
        return predict_single(model, image, pad_multiple=pad_multiple, pad_value=pad_value, autocast=autocast)
    batch = image if image.dim() == 4 else image[None]
    # The images and their mirrors in one batch.
    logits = predict_single(model, torch.cat([batch, batch.flip(-1)]), pad_multiple=pad_multiple,
                            pad_value=pad_value, autocast=autocast)
    n = len(batch)
    scores = logits[:n].softmax(1) + logits[n:].flip(-1).softmax(1)
    return scores if image.dim() == 4 else scores[0]


def probabilities(scores: torch.Tensor, *, scales: Sequence[float] | None = None, flip: bool = False,
                  fusion: str = "softmax") -> torch.Tensor:
    """Class probabilities (summing to 1 over the class dimension, the one before H x W) from the
    scores :func:`predict_image` returned for the same options."""
    if fusion == "original" or (scales is None and not flip):  # logits, or the log of the scores
        return scores.softmax(-3)
    return scores / ((len(scales) if scales is not None else 1) * (2 if flip else 1))


class _Shard(torch.utils.data.Dataset):
    """This rank's images: indices ``rank, rank + world, ...``, no sample repeated or padded."""

    def __init__(self, dataset: SegDataset, rank: int, world_size: int) -> None:
        self.dataset = dataset
        self.indices = range(rank, len(dataset), world_size)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> tuple[int, np.ndarray, np.ndarray | None]:
        index = self.indices[k]
        image, mask = self.dataset.load(index)
        return index, image, mask


def evaluate(model: nn.Module, dataset: SegDataset, *, scales: Sequence[float] | None = None,
             flip: bool = False, base_size: int | None = None, crop_size: int | None = None,
             preprocess: Preprocess = Preprocess(), convention: str = "present", pad_multiple: int = 8, max_batch: int | str = "auto",
             autocast: AutocastDtype = None, device: torch.device | str | None = None,
             num_workers: int = 2, progress: bool = True,
             callback: ImageCallback | None = None, align_corners: bool = True,
             fusion: str = "softmax", window_placement: str = "border",
             max_size: int | None = None) -> dict[str, Any]:
    """Evaluate ``model`` on ``dataset`` and return :meth:`ConfusionMatrix.compute`'s metrics.

    Each image is predicted by :func:`predict_image`: without ``scales`` whole at its own size
    (:func:`predict_single`; with ``flip`` together with its mirror, softmax probabilities summed),
    unless its long side exceeds ``max_size``: then it is covered at its own size by ``crop_size``
    windows, so that the network's memory stays that of a window batch whatever the image size
    (what remains grows with the image: the class scores, C x H x W float32);
    with ``scales`` (plus ``base_size`` and ``crop_size``) by :func:`predict_multiscale`, in
    forwards of ``max_batch`` windows (:func:`resolve_max_batch`), with its ``align_corners``,
    ``fusion`` and ``window_placement`` (they apply to multi-scale evaluation only; invalid values
    raise ValueError before anything runs).
    ``preprocess`` normalises the raw uint8 images; padding is a black pixel, as in training.

    Under torch.distributed rank r evaluates images r, r + world, ... and the confusion matrices
    are summed, so the result equals a single-process run exactly. Every rank must call this.
    The progress bar (images/s, ETA) shows on rank 0 only. Unlabelled images (mask None) are
    predicted and passed to ``callback`` but not scored. The result also holds ``num_images``
    (over all ranks) and ``seconds`` (this rank's wall time).
    """
    check_convention(convention)  # now rather than after the whole dataset
    check_multiscale_options(fusion, window_placement)
    if scales is not None and (base_size is None or crop_size is None):
        raise ConfigError(f"multi-scale evaluation with scales={list(scales)} needs base_size and "
                          f"crop_size, got base_size={base_size}, crop_size={crop_size}")
    if max_size is not None and (crop_size is None or max_size < 1):
        raise ConfigError(f"max_size={max_size} needs a crop_size for its windows and must be positive, "
                          f"got crop_size={crop_size}")
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    windows = scales is not None or max_size is not None
    max_batch = resolve_max_batch(max_batch, crop_size if windows else None, device)
    pad_value = preprocess.pad_value
    confmat = ConfusionMatrix(dataset.num_classes, dataset.ignore_index, device)

    shard = _Shard(dataset, distributed.get_rank(), distributed.get_world_size())
    loader = torch.utils.data.DataLoader(shard, batch_size=None, num_workers=num_workers,
                                         pin_memory=device.type == "cuda")
    bar = tqdm(total=len(shard), unit="img", desc="eval", dynamic_ncols=True,
               disable=not (progress and distributed.is_main_process()))
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            for index, image, mask in loader:
                x = preprocess(image.to(device, non_blocking=True))
                pred = predict_image(model, x, scales=scales, flip=flip, base_size=base_size, crop_size=crop_size,
                                     num_classes=dataset.num_classes, pad_multiple=pad_multiple,
                                     pad_value=pad_value, max_batch=max_batch, autocast=autocast,
                                     align_corners=align_corners, fusion=fusion,
                                     window_placement=window_placement, max_size=max_size).argmax(0)
                if mask is not None:
                    confmat.update(pred, mask)
                if callback is not None:
                    callback(int(index), image.numpy(), None if mask is None else mask.numpy(),
                             pred.cpu().numpy())
                bar.update()
    finally:
        bar.close()
        model.train(was_training)
    seconds = time.perf_counter() - start
    confmat.reduce_from_all_processes()
    images = distributed.all_reduce(torch.tensor(len(shard), device=device))
    result = confmat.compute(convention)
    result.update(num_images=int(images), seconds=seconds)
    return result
