"""Write predicted masks to disk: benchmark submission PNGs plus pictures for people.

For an image named ``<name>`` (which may contain '/') :func:`write_masks` writes, per kind asked for,

* ``labels/<name>.png``: the benchmark's submission format (``encode``: ADE20K prediction + 1,
  Cityscapes labelIds), 8-bit greyscale;
* ``color/<name>.png``: the prediction as a palette image with the dataset's colours;
* ``overlay/<name>.png``: the colours alpha-blended over the image;
* ``compare/<name>.png``: image | prediction | ground truth (ignored pixels black), without the
  last panel for unlabelled images.

:class:`MaskExporter` (evaluation) and :meth:`segkit.inference.predictor.Prediction.save` both write through
it. Every file is written under a temporary name and renamed into place, so an interrupted run
never leaves a truncated PNG that a later evaluation would read.
"""

import io
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from segkit.errors import DataError
from segkit.files import write_bytes_atomic

KINDS = ("labels", "color", "overlay", "compare")
OVERLAY_ALPHA = 0.5


def full_palette(palette: np.ndarray) -> np.ndarray:
    """``palette`` padded to 256 entries with black, so that the ignore index (255) shows black."""
    full = np.zeros((256, 3), np.uint8)
    full[: len(palette)] = palette
    return full


def colorize(labels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """H x W class ids (or 255 for ignore) -> H x W x 3 uint8 colours."""
    return full_palette(palette)[np.asarray(labels).astype(np.uint8)]


def overlay(image: np.ndarray, labels: np.ndarray, palette: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """The class colours alpha-blended over ``image`` (H x W x 3 uint8)."""
    blend = (1 - alpha) * image + alpha * colorize(labels, palette)
    return blend.round().astype(np.uint8)


def render(kind: str, pred: np.ndarray, image: np.ndarray, palette: np.ndarray,
           encode: Callable[[np.ndarray], np.ndarray], mask: np.ndarray | None = None,
           alpha: float = OVERLAY_ALPHA) -> Image.Image:
    """The ``kind`` picture (one of :data:`KINDS`) of prediction ``pred`` for ``image``."""
    if kind == "labels":
        encoded = encode(pred)
        if encoded.dtype != np.uint8 or encoded.shape != pred.shape:
            raise TypeError(f"encode_prediction must return a uint8 array of shape {pred.shape}, "
                            f"got {encoded.dtype} {encoded.shape}")
        return Image.fromarray(encoded)
    if kind == "color":
        color = Image.fromarray(pred.astype(np.uint8))
        color.putpalette(full_palette(palette).tobytes())
        return color
    if kind == "overlay":
        return Image.fromarray(overlay(image, pred, palette, alpha))
    if kind == "compare":
        return Image.fromarray(comparison(image, pred, mask, palette))
    raise ValueError(f"unknown kind {kind!r}; choose from {', '.join(KINDS)}")


def comparison(image: np.ndarray, pred: np.ndarray, mask: np.ndarray | None, palette: np.ndarray) -> np.ndarray:
    """image | prediction | ground truth (without the last panel when unlabelled), H x 3W x 3 uint8."""
    panels = [image, colorize(pred, palette)] + ([] if mask is None else [colorize(mask, palette)])
    return np.concatenate(panels, axis=1)


def mask_path(out_dir: Path, kind: str, name: str) -> Path:
    """Where the ``kind`` PNG of the image ``name`` goes below ``out_dir``."""
    if not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise DataError(f"image name {name!r} would be written outside {out_dir}")
    return Path(out_dir) / kind / f"{name}.png"


def write_png(path: Path, image: Image.Image) -> None:
    """``image`` as a PNG at ``path``, atomically (a full disk: WriteError naming ``path``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    encoded = io.BytesIO()
    image.save(encoded, format="PNG")
    # No fsync per mask (an export writes thousands); the temporary name is per process, as ranks
    # or predictors may write the same name.
    write_bytes_atomic(path, encoded.getvalue(), sync=False, tmp=path.with_name(f".{path.name}.{os.getpid()}.tmp"))


def write_masks(out_dir: str | os.PathLike, name: str, kinds: Sequence[str], pred: np.ndarray, image: np.ndarray,
                palette: np.ndarray, encode: Callable[[np.ndarray], np.ndarray], mask: np.ndarray | None = None,
                alpha: float = OVERLAY_ALPHA) -> dict[str, Path]:
    """Write the ``kinds`` PNGs of ``pred`` (H x W class ids) for ``image`` named ``name``; returns
    their paths by kind. Existing files of that name are replaced."""
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown kind(s) {', '.join(map(repr, unknown))}; choose from {', '.join(KINDS)}")
    paths = {}
    for kind in kinds:
        paths[kind] = mask_path(Path(out_dir), kind, name)
        write_png(paths[kind], render(kind, pred, image, palette, encode, mask, alpha))
    return paths


def export_kinds(overlay: bool = True, side_by_side: bool = False) -> tuple[str, ...]:
    """The kinds an export writes: labels and colours, optionally overlays and comparisons."""
    return ("labels", "color") + (("overlay",) if overlay else ()) + (("compare",) if side_by_side else ())
