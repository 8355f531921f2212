"""Mask export of an evaluation: the export directory (refused when not empty, unless asked) and the
per-image callback that writes each prediction through :func:`segkit.inference.masks.write_masks`."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import numpy as np

from segkit import distributed
from segkit.errors import ConfigError
from segkit.inference.masks import OVERLAY_ALPHA, export_kinds, mask_path, write_masks


class ExportDataset(Protocol):
    palette: np.ndarray

    def name(self, index: int) -> str: ...

    def encode_prediction(self, pred: np.ndarray) -> np.ndarray: ...


def open_export_dir(out_dir: str | os.PathLike, overwrite: bool) -> Path:
    """``out_dir``, created; a non-empty one is refused unless ``overwrite`` (files are then replaced
    one by one, other files left alone). Under torch.distributed every rank must call it: all ranks
    check the directory before any of them writes into it."""
    out_dir = Path(out_dir)
    if not overwrite and out_dir.is_dir() and any(out_dir.iterdir()):
        raise ConfigError(f"export directory {out_dir} is not empty; choose another one "
                          f"or pass export.overwrite=true to replace its masks")
    distributed.barrier()
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


class MaskExporter:
    """Per-image callback for :func:`segkit.inference.multiscale.evaluate` that writes predictions
    (:func:`write_masks`) into ``out_dir`` (:func:`open_export_dir`: construct it on every rank)."""

    def __init__(self, out_dir: str | os.PathLike, dataset: ExportDataset, overwrite: bool = False,
                 overlay: bool = True, side_by_side: bool = False, alpha: float = OVERLAY_ALPHA) -> None:
        self.out_dir = open_export_dir(out_dir, overwrite)
        self.dataset = dataset
        self.kinds = export_kinds(overlay, side_by_side)
        self.alpha = alpha

    def path(self, kind: str, name: str) -> Path:
        """Where the ``kind`` ("labels", "color", "overlay", "compare") PNG of ``name`` goes."""
        return mask_path(self.out_dir, kind, name)

    def __call__(self, index: int, image: np.ndarray, mask: np.ndarray | None,
                 pred: np.ndarray) -> None:
        write_masks(self.out_dir, self.dataset.name(index), self.kinds, pred, image, self.dataset.palette,
                    self.dataset.encode_prediction, mask, self.alpha)
