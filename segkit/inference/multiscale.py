"""Whole-image and multi-scale + flip inference of one normalised image (or a batch).

A model maps a normalised float batch B x 3 x H x W to ``{"out": logits B x C x H x W}``. The
functions here take images that are already normalised, and the views, fusion and numerics from
one :class:`~segkit.inference.options.InferenceOptions`. :func:`segkit.evaluation.loop.evaluate`
runs them over a dataset.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segkit.inference.options import AutocastDtype, InferenceOptions, torch_dtype
from segkit.models.maps import class_softmax, classes_innermost

PadValue = float | Sequence[float]


def _autocast(device: torch.device, dtype: AutocastDtype) -> contextlib.AbstractContextManager:
    dtype = torch_dtype(dtype, "autocast")
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
    if classes_innermost(x, 1):
        # Classes innermost (see _ScaleView.add): kept so in a fresh channels_last map. F.interpolate
        # reads a cropped view, or any at batch 1 with a batch stride other than h * w * C, as NCHW
        # (its slower kernel), and contiguous() does not rewrite a batch-1 stride.
        x = torch.empty_like(x, memory_format=torch.channels_last).copy_(x)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)


def _log_resize(log_x: torch.Tensor, size: tuple[int, int], align_corners: bool) -> torch.Tensor:
    """``log(_resize(exp(log_x)))`` for ``log_x`` C x h x w, computed without leaving log space.

    Bilinear interpolation is separable and each output pixel along an axis mixes at most two
    input pixels, ``w0 * v[i0] + w1 * v[i1]``; in log space that is
    ``logaddexp(log w0 + log_v[i0], log w1 + log_v[i1])``, which neither overflows nor underflows
    however large the values are. The weights are PyTorch's own: they are read off
    ``F.interpolate`` applied to an identity matrix, one axis at a time.
    """
    # Classes innermost (see _ScaleView.add) stay so: the axes are taken on the H x W x C view
    # (index_select returns its result in the view's order).
    inner = classes_innermost(log_x, 0)
    maps = log_x.movedim(0, -1) if inner else log_x
    for dim, (length, target) in enumerate(zip(log_x.shape[-2:], size), start=0 if inner else 1):
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
        maps = torch.logaddexp(maps.index_select(dim, first) + w0.log().view(shape),
                               maps.index_select(dim, second) + w1.log().view(shape))
    return maps.movedim(-1, 0) if inner else maps


def _forward(model: nn.Module, x: torch.Tensor, amp: AutocastDtype) -> torch.Tensor:
    with _autocast(x.device, amp):
        logits = model(x)["out"]
    if logits.shape[-2:] != x.shape[-2:]:
        raise ValueError(f"model returned logits of size {tuple(logits.shape[-2:])} for an input "
                         f"of size {tuple(x.shape[-2:])}; it must upsample to the input size")
    return logits.float()


@torch.inference_mode()
def predict_single(model: nn.Module, image: torch.Tensor, *, pad_multiple: int = 8,
                   pad_value: PadValue = 0.0, amp: AutocastDtype = None,
                   argmax: bool = False) -> torch.Tensor:
    """Whole-image float32 logits C x H x W (B x C x H x W for a batch), or labels if ``argmax``,
    optionally under ``amp`` autocast.

    The image is padded at the bottom/right to a multiple of ``pad_multiple`` (the output stride)
    so that every feature cell covers whole input pixels, and the logits are cropped back.
    The model must be in eval mode.
    """
    batch = image if image.dim() == 4 else image[None]
    h, w = batch.shape[-2:]
    padded = _pad(batch, math.ceil(h / pad_multiple) * pad_multiple,
                  math.ceil(w / pad_multiple) * pad_multiple, pad_value)
    logits = _forward(model, padded, amp)[..., :h, :w]
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
    return InferenceOptions(max_batch=max_batch).max_batch  # checked there


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
            # In the windows' layout (classes innermost after a CPU bf16 model, see
            # segkit.models.segmentor.resize_logits), so that adding a window reads and writes in order.
            self.acc = out.new_full((*self.image.shape[-2:], out.shape[0]), fill).permute(2, 0, 1) \
                if classes_innermost(out, 0) else out.new_full((out.shape[0], *self.image.shape[-2:]), fill)
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
def predict_multiscale(model: nn.Module, image: torch.Tensor, options: InferenceOptions, *, base_size: int,
                       crop_size: int, num_classes: int, pad_value: PadValue = 0.0,
                       argmax: bool = False) -> torch.Tensor:
    """Multi-scale (+ flip) prediction for one normalised image 3 x H x W, as in the paper, with
    ``options.scales`` and ``options.flip`` (and the options below).

    For each scale the image is resized (bilinear, aspect kept) so that its long side is
    ``ceil(base_size * scale)`` (the short side ``int(short * long / long_side + 0.5)``) and
    padded at the bottom/right to at least ``crop_size`` with ``pad_value`` (pass the normalised
    value of a black pixel, ``-mean / std`` per channel, as the original does). Crop-size windows
    with stride ``int(crop_size * 2 / 3)``, ``ceil((padded - crop) / stride) + 1`` per axis, are
    run (a single one when the scaled image fits the crop) and overlaps averaged by count. With
    ``flip`` the mirrored windows are run too and un-mirrored. Each scale's map is cropped to the
    scaled image, resized back to H x W and the maps are summed over scales.

    Every window is crop x crop whatever the scale, so the windows of all scales and their
    mirrored copies are stacked into forwards of ``options.max_batch`` images
    (:func:`resolve_max_batch`; under ``options.amp`` autocast): a few full batches instead
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

    Returns the C x H x W map above, or its argmax H x W when ``argmax``.
    """
    fusion = options.fusion
    max_batch = resolve_max_batch(options.max_batch, crop_size, image.device)
    _, h, w = image.shape
    flips = (False, True) if options.flip else (False,)
    views = []
    for scale in options.scales:
        long_side = math.ceil(base_size * scale)
        short_side = max(1, int(min(h, w) * long_side / max(h, w) + 0.5))
        size = (long_side, short_side) if h > w else (short_side, long_side)
        views.append(_ScaleView(image, size, crop_size, pad_value, len(flips), fusion=fusion,
                                window_placement=options.window_placement, align_corners=options.align_corners))
    jobs = [(view, box, mirrored) for view in views for box in view.boxes for mirrored in flips]
    total: torch.Tensor | None = None  # the first finished view's map itself: one C x H x W less
    for start in range(0, len(jobs), max_batch):
        chunk = jobs[start:start + max_batch]
        batch = torch.stack([view.window(box, mirrored) for view, box, mirrored in chunk])
        out = _forward(model, batch, options.amp)
        if fusion == "softmax":
            out = class_softmax(out)
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
def predict_image(model: nn.Module, image: torch.Tensor, options: InferenceOptions, *, base_size: int | None = None,
                  crop_size: int | None = None, num_classes: int | None = None, pad_multiple: int = 8,
                  pad_value: PadValue = 0.0) -> torch.Tensor:
    """Scores C x H x W of a normalised image 3 x H x W (B x C x H x W for a batch B x 3 x H x W,
    taken image by image with scales) as :func:`segkit.evaluation.loop.evaluate` predicts: their
    argmax is its prediction.

    Without ``options.scales``: the whole image's logits (:func:`predict_single`), or with
    ``options.flip`` the softmax probabilities of the image and its mirror (one batch) summed. With
    scales: :func:`predict_multiscale` (which needs ``base_size``, ``crop_size`` and
    ``num_classes``). Without scales, an image whose long side exceeds ``options.max_size`` is
    covered at its own size by ``crop_size`` windows, so that the network's memory stays that of a
    window batch. :func:`probabilities` turns the scores into class probabilities.
    """
    geometry = dict(base_size=base_size, crop_size=crop_size, num_classes=num_classes, pad_value=pad_value)
    if image.dim() == 4 and (options.scales is not None
                             or (options.max_size is not None and max(image.shape[-2:]) > options.max_size)):
        return torch.stack([predict_image(model, x, options, pad_multiple=pad_multiple, **geometry) for x in image])
    if options.scales is not None:
        return predict_multiscale(model, image, options, **geometry)
    if options.max_size is not None and max(image.shape[-2:]) > options.max_size:
        # The image at its own size (scale 1 of a base of its long side) in crop windows.
        whole = options.replace(scales=(1.0,), fusion="softmax", window_placement="border")
        scores = predict_multiscale(model, image, whole, **{**geometry, "base_size": max(image.shape[-2:])})
        # Probabilities: summed over the flips as below; without flip their log stands for the
        # logits (its softmax is the probabilities themselves).
        return scores if options.flip else scores.log_()
    if not options.flip:
        return predict_single(model, image, pad_multiple=pad_multiple, pad_value=pad_value, amp=options.amp)
    batch = image if image.dim() == 4 else image[None]
    # The images and their mirrors in one batch.
    logits = predict_single(model, torch.cat([batch, batch.flip(-1)]), pad_multiple=pad_multiple,
                            pad_value=pad_value, amp=options.amp)
    n = len(batch)
    scores = class_softmax(logits[:n]) + class_softmax(logits[n:].flip(-1))
    return scores if image.dim() == 4 else scores[0]


def probabilities(scores: torch.Tensor, options: InferenceOptions) -> torch.Tensor:
    """Class probabilities (summing to 1 over the class dimension, the one before H x W) from the
    scores :func:`predict_image` returned for the same ``options``."""
    if options.fusion == "original" or (options.scales is None and not options.flip):  # logits, or their log
        return class_softmax(scores, -3)
    return scores / ((len(options.scales) if options.scales is not None else 1) * (2 if options.flip else 1))
