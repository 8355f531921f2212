"""Dataset evaluation across ranks: every image predicted as :mod:`segkit.inference.multiscale`
predicts it, scored in one confusion matrix summed over the ranks."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from segkit import distributed
from segkit.data.preprocess import Preprocess
from segkit.errors import ConfigError
from segkit.evaluation.metrics import ConfusionMatrix, check_convention, image_stats
from segkit.inference.multiscale import predict_image
from segkit.inference.options import InferenceOptions

#: ``callback(index, image HxWx3 uint8, mask HxW uint8 or None, prediction HxW int64)``
ImageCallback = Callable[[int, np.ndarray, np.ndarray | None, np.ndarray], None]
#: ``row_callback(row, image, mask, prediction)`` for each labelled image (row: its ``per_image`` entry)
RowCallback = Callable[[dict[str, Any], np.ndarray, np.ndarray, np.ndarray], None]


class SegDataset(Protocol):
    """What :func:`evaluate` uses of a segkit dataset (masks: train ids, ignore_index elsewhere)."""

    num_classes: int
    ignore_index: int

    def __len__(self) -> int: ...

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray | None]: ...


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


def evaluate(model: nn.Module, dataset: SegDataset, options: InferenceOptions = InferenceOptions(), *,
             base_size: int | None = None, crop_size: int | None = None, preprocess: Preprocess = Preprocess(),
             convention: str = "present", pad_multiple: int = 8, device: torch.device | str | None = None,
             num_workers: int = 2, progress: bool = True, callback: ImageCallback | None = None,
             per_image: bool = False, row_callback: RowCallback | None = None) -> dict[str, Any]:
    """Evaluate ``model`` on ``dataset`` and return :meth:`ConfusionMatrix.compute`'s metrics.

    Each image is predicted by :func:`~segkit.inference.multiscale.predict_image` with ``options``:
    without scales whole at its own size (with flip together with its mirror, softmax probabilities
    summed), unless its long side exceeds ``options.max_size``: then it is covered at its own size
    by ``crop_size`` windows, so that the network's memory stays that of a window batch whatever
    the image size (what remains grows with the image: the class scores, C x H x W float32); with
    scales (plus ``base_size`` and ``crop_size``) by
    :func:`~segkit.inference.multiscale.predict_multiscale`, in forwards of ``options.max_batch``
    windows. ``preprocess`` normalises the raw uint8 images; padding is a black pixel, as in training.

    Under torch.distributed rank r evaluates images r, r + world, ... and the confusion matrices
    are summed, so the result equals a single-process run exactly. Every rank must call this.
    The progress bar (images/s, ETA) shows on rank 0 only. Unlabelled images (mask None) are
    predicted and passed to ``callback`` but not scored. The result also holds ``num_images``
    (over all ranks) and ``seconds`` (this rank's wall time).

    With ``per_image`` it holds ``per_image`` too: for every labelled image, on rank 0 (the other
    ranks: an empty list), ``{"index": i, **image_stats}`` (:func:`~segkit.evaluation.metrics.image_stats`,
    from the counts the image added to the matrix: no second count), in index order.
    ``row_callback`` gets each such row with the image's pixels, on the rank that predicted it.
    """
    check_convention(convention)  # now rather than after the whole dataset
    if options.scales is not None and (base_size is None or crop_size is None):
        raise ConfigError(f"multi-scale evaluation with scales={list(options.scales)} needs base_size and "
                          f"crop_size, got base_size={base_size}, crop_size={crop_size}")
    if options.max_size is not None and crop_size is None:
        raise ConfigError(f"max_size={options.max_size} needs a crop_size for its windows")
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    pad_value = preprocess.pad_value
    confmat = ConfusionMatrix(dataset.num_classes, dataset.ignore_index, device)

    shard = _Shard(dataset, distributed.get_rank(), distributed.get_world_size())
    loader = torch.utils.data.DataLoader(shard, batch_size=None, num_workers=num_workers,
                                         pin_memory=device.type == "cuda")
    bar = tqdm(total=len(shard), unit="img", desc="eval", dynamic_ncols=True,
               disable=not (progress and distributed.is_main_process()))
    was_training = model.training
    model.eval()
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            for index, image, mask in loader:
                x = preprocess(image.to(device, non_blocking=True))
                pred = predict_image(model, x, options, base_size=base_size, crop_size=crop_size,
                                     num_classes=dataset.num_classes, pad_multiple=pad_multiple,
                                     pad_value=pad_value).argmax(0)
                if mask is not None:
                    counts = confmat.update(pred, mask)
                    if per_image or row_callback is not None:
                        row = {"index": int(index), **image_stats(counts, dataset.num_classes)}
                        rows.append(row)
                        if row_callback is not None:
                            row_callback(row, image.numpy(), mask.numpy(), pred.cpu().numpy())
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
    if per_image:
        result["per_image"] = sorted(distributed.gather_to_main(rows), key=lambda row: row["index"])
    return result
