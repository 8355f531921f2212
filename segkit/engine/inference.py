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


def _autocast(device: torch.device, dtype: AutocastDtype) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    if isinstance(dtype, str):
        if dtype not in AUTOCAST_DTYPES:
            raise ConfigError(f"autocast dtype must be one of {sorted(AUTOCAST_DTYPES)} or null, "
                              f"got {dtype!r}")
        dtype = AUTOCAST_DTYPES[dtype]
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


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


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


def prepare_model(model: nn.Module, device: torch.device | str, *, channels_last: bool = True,
                  fold_bn: bool = True, compile: bool = False) -> nn.Module:
    """``model`` (changed in place) set up for evaluation only: on ``device`` in eval mode, BatchNorm
    folded into the convs, NHWC memory format, and optionally ``torch.compile``d.

    Folding and channels_last give the same outputs up to float rounding; on CPU (oneDNN) they make
    a forward ~17% faster (bench/NOTES.md). ``compile`` uses inductor with frozen weights
    (constant-folded and, on CPU, pre-packed for oneDNN): the first forward of each input shape
    compiles (about a minute on two cores), so it pays off on long evaluations. The model must not
    be trained afterwards.
    """
    model.to(device).eval()
    if fold_bn:
        example = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
        fold_batchnorm(model, example.to(device))
    model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    return torch.compile(model, options={"freezing": True}) if compile else model


def _window_starts(length: int, crop: int, stride: int) -> list[int]:
    # As many windows as the original code (ceil((L - crop) / stride) + 1), but the last one ends at
    # the border instead of hanging over it into extra padding.
    count = math.ceil((length - crop) / stride) + 1
    return [min(i * stride, length - crop) for i in range(count)]


class _ScaleView:
    """The image at one scale, padded to at least the crop, with its crop-size windows and the
    probabilities accumulated over them (allocated on first use, freed by :meth:`finish`).
    ``pending`` counts the window forwards (``copies`` per window: 2 with flip) still to add."""

    def __init__(self, image: torch.Tensor, size: tuple[int, int], crop: int,
                 pad_value: PadValue, copies: int) -> None:
        self.size = size
        self.crop = crop
        self.image = _pad(_resize(image[None], size)[0], max(size[0], crop), max(size[1], crop),
                          pad_value)
        height, width = self.image.shape[-2:]
        stride = int(crop * 2 / 3)
        self.boxes = [(y, x) for y in _window_starts(height, crop, stride)
                      for x in _window_starts(width, crop, stride)]
        self.pending = len(self.boxes) * copies
        self.probs: torch.Tensor | None = None

    def window(self, y: int, x: int, mirrored: bool) -> torch.Tensor:
        win = self.image[:, y:y + self.crop, x:x + self.crop]
        return win.flip(-1) if mirrored else win

    def add(self, probs: torch.Tensor, y: int, x: int, mirrored: bool) -> None:
        if self.probs is None:
            self.probs = probs.new_zeros((probs.shape[0], *self.image.shape[-2:]))
        self.probs[:, y:y + self.crop, x:x + self.crop] += probs.flip(-1) if mirrored else probs
        self.pending -= 1

    def finish(self, out_size: tuple[int, int]) -> torch.Tensor:
        """Overlaps averaged, padding cropped off, resized to ``out_size``."""
        count = torch.zeros_like(self.probs[:1])
        for y, x in self.boxes:
            count[:, y:y + self.crop, x:x + self.crop] += 1
        probs = (self.probs / count)[None, :, :self.size[0], :self.size[1]]
        self.probs = None
        return _resize(probs, out_size)[0]


@torch.inference_mode()
def predict_multiscale(model: nn.Module, image: torch.Tensor, scales: Sequence[float], flip: bool,
                       base_size: int, crop_size: int, num_classes: int, *, max_batch: int = 8,
                       pad_value: PadValue = 0.0, autocast: AutocastDtype = None,
                       argmax: bool = False) -> torch.Tensor:
    """Multi-scale (+ flip) prediction for one normalised image 3 x H x W, as in the paper.

    For each scale the image is resized (bilinear, aspect kept) so that its long side is
    ``ceil(base_size * scale)``. If that fits in ``crop_size`` it is padded to the crop and run
    once; otherwise crop-size windows with stride ``int(crop_size * 2 / 3)`` are run and
    overlapping probabilities averaged (a short side below the crop is padded first). With
    ``flip`` the mirrored windows are run too and un-mirrored. Each scale's map is resized back
    to H x W and the maps are summed over scales and flips.

    Every window is crop x crop whatever the scale, so the windows of all scales and their
    mirrored copies are stacked into forwards of ``max_batch`` images: a few full batches instead
    of one small forward per window keep the device busy. Each scale's probability map lives
    only until its last window is done.

    Returns float32 probabilities C x H x W that sum to ``len(scales) * (2 if flip else 1)`` per
    pixel (divide by that for a mean), or their argmax H x W when ``argmax``.

    Unlike the original code, which summed the raw logits of the flip pair and exponentiated
    (``exp(l + l_flipped)``, unnormalised scores), we sum softmax probabilities: a per-pixel
    offset of the logits changes nothing, every scale and flip weighs the same at every pixel
    (no single overconfident view dominates) and values stay bounded under fp16/bf16 autocast.
    The last window of a row/column is aligned to the border rather than padded past it.
    The model must be in eval mode.
    """
    _, h, w = image.shape
    flips = (False, True) if flip else (False,)
    views = []
    for scale in scales:
        long_side = math.ceil(base_size * scale)
        short_side = max(1, int(min(h, w) * long_side / max(h, w) + 0.5))
        size = (long_side, short_side) if h > w else (short_side, long_side)
        views.append(_ScaleView(image, size, crop_size, pad_value, len(flips)))
    jobs = [(view, y, x, mirrored) for view in views for y, x in view.boxes for mirrored in flips]
    total = image.new_zeros((num_classes, h, w), dtype=torch.float32)
    for start in range(0, len(jobs), max_batch):
        chunk = jobs[start:start + max_batch]
        batch = torch.stack([view.window(y, x, mirrored) for view, y, x, mirrored in chunk])
        out = _forward(model, batch, autocast).softmax(1)
        for probs, (view, y, x, mirrored) in zip(out, chunk):
            view.add(probs, y, x, mirrored)
            if view.pending == 0:
                total += view.finish((h, w))
    return total.argmax(0) if argmax else total


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
             callback: ImageCallback | None = None) -> dict[str, Any]:
    """Evaluate ``model`` on ``dataset`` and return :meth:`ConfusionMatrix.compute`'s metrics.

    Without ``scales`` each image is predicted whole at its own size (:func:`predict_single`; with
    ``flip`` together with its mirror, softmax probabilities summed);
    with ``scales`` (plus ``base_size`` and ``crop_size``) by :func:`predict_multiscale`, in
    forwards of ``max_batch`` windows (:func:`resolve_max_batch`).
    ``preprocess`` normalises the raw uint8 images; padding is a black pixel, as in training.

    Under torch.distributed rank r evaluates images r, r + world, ... and the confusion matrices
    are summed, so the result equals a single-process run exactly. Every rank must call this.
    The progress bar (images/s, ETA) shows on rank 0 only. Unlabelled images (mask None) are
    predicted and passed to ``callback`` but not scored. The result also holds ``num_images``
    (over all ranks) and ``seconds`` (this rank's wall time).
    """
    check_convention(convention)  # now rather than after the whole dataset
    if scales is not None and (base_size is None or crop_size is None):
        raise ConfigError(f"multi-scale evaluation with scales={list(scales)} needs base_size and "
                          f"crop_size, got base_size={base_size}, crop_size={crop_size}")
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    max_batch = resolve_max_batch(max_batch, crop_size if scales is not None else None, device)
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
                if scales is None and flip:  # the image and its mirror in one batch
                    logits = predict_single(model, torch.stack([x, x.flip(-1)]), pad_multiple=pad_multiple,
                                            pad_value=pad_value, autocast=autocast)
                    pred = (logits[0].softmax(0) + logits[1].flip(-1).softmax(0)).argmax(0)
                elif scales is None:
                    pred = predict_single(model, x, pad_multiple=pad_multiple, pad_value=pad_value,
                                          autocast=autocast, argmax=True)
                else:
                    pred = predict_multiscale(model, x, scales, flip, base_size, crop_size,
                                              dataset.num_classes, max_batch=max_batch,
                                              pad_value=pad_value, autocast=autocast, argmax=True)
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
