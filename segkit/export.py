"""Write predicted masks to disk: benchmark submission PNGs plus pictures for people.

For an image named ``<name>`` (which may contain '/') an exporter writes

* ``labels/<name>.png``: the benchmark's submission format (``dataset.encode_prediction``:
  ADE20K prediction + 1, Cityscapes labelIds), 8-bit greyscale;
* ``color/<name>.png``: the prediction as a palette image with the dataset's colours;
* ``overlay/<name>.png`` (``overlay=True``): the colours alpha-blended over the image;
* ``compare/<name>.png`` (``side_by_side=True``): image | prediction | ground truth (ignored
  pixels black), without the last panel for unlabelled images.

Every file is written under a temporary name and renamed into place, so an interrupted run never
leaves a truncated PNG that a later evaluation would read.
"""

import os
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from segkit import distributed
from segkit.errors import ConfigError, DataError


class ExportDataset(Protocol):
    palette: np.ndarray

    def name(self, index: int) -> str: ...

    def encode_prediction(self, pred: np.ndarray) -> np.ndarray: ...


def full_palette(palette: np.ndarray) -> np.ndarray:
    """The class colours as 256 entries, so that the ignore index (255) of a ground truth shows black."""
    out = np.zeros((256, 3), np.uint8)
    out[: len(palette)] = palette
    return out


def comparison(image: np.ndarray, pred: np.ndarray, mask: np.ndarray | None, palette: np.ndarray) -> np.ndarray:
    """image | prediction | ground truth (without the last panel when unlabelled), HxWx3 uint8;
    ``palette`` from :func:`full_palette`."""
    panels = [image, palette[pred.astype(np.uint8)]] + ([] if mask is None else [palette[mask]])
    return np.concatenate(panels, axis=1)


class MaskExporter:
    """Per-image callback for :func:`segkit.engine.inference.evaluate` that writes predictions.

    Refuses a non-empty ``out_dir`` unless ``overwrite`` (files are then replaced one by one, other
    files left alone). Under torch.distributed construct it on every rank before evaluating: all
    ranks check the directory before any of them writes into it.
    """

    def __init__(self, out_dir: str | os.PathLike, dataset: ExportDataset, overwrite: bool = False,
                 overlay: bool = True, side_by_side: bool = False, alpha: float = 0.5) -> None:
        self.out_dir = Path(out_dir)
        self.dataset = dataset
        self.overlay = overlay
        self.side_by_side = side_by_side
        self.alpha = alpha
        if not overwrite and self.out_dir.is_dir() and any(self.out_dir.iterdir()):
            raise ConfigError(f"export directory {self.out_dir} is not empty; choose another one "
                              f"or pass export.overwrite=true to replace its masks")
        distributed.barrier()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._palette = full_palette(dataset.palette)

    def path(self, kind: str, name: str) -> Path:
        """Where the ``kind`` ("labels", "color", "overlay", "compare") PNG of ``name`` goes."""
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise DataError(f"image name {name!r} would be written outside {self.out_dir}")
        return self.out_dir / kind / f"{name}.png"

    def _write(self, kind: str, name: str, image: Image.Image) -> None:
        path = self.path(kind, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            image.save(tmp, format="PNG")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def __call__(self, index: int, image: np.ndarray, mask: np.ndarray | None,
                 pred: np.ndarray) -> None:
        name = self.dataset.name(index)
        encoded = self.dataset.encode_prediction(pred)
        if encoded.dtype != np.uint8 or encoded.shape != pred.shape:
            raise TypeError(f"encode_prediction must return a uint8 array of shape {pred.shape}, "
                            f"got {encoded.dtype} {encoded.shape}")
        self._write("labels", name, Image.fromarray(encoded))
        labels = pred.astype(np.uint8)
        color = Image.fromarray(labels)
        color.putpalette(self._palette.tobytes())
        self._write("color", name, color)
        pred_rgb = self._palette[labels]
        if self.overlay:
            blend = (1 - self.alpha) * image + self.alpha * pred_rgb
            self._write("overlay", name, Image.fromarray(blend.round().astype(np.uint8)))
        if self.side_by_side:
            self._write("compare", name, Image.fromarray(comparison(image, labels, mask, self._palette)))
