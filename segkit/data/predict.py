"""A folder of unlabelled images to predict (``predict.input=DIR``).

The images need nothing of the dataset the model was trained on: the class names, palette and
submission format come from the checkpoint's :class:`~segkit.data.label_space.LabelSpace`.
"""
from __future__ import annotations

from pathlib import Path

from segkit.data.base import IMAGE_SUFFIXES, index_files
from segkit.errors import DataError


def image_files(folder: str | Path) -> dict[str, Path]:
    """Every image below ``folder``, keyed by its relative path without suffix (which names its
    predictions), sorted."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DataError(f"predict.input={str(folder)!r} is not a directory of images")
    files = index_files(folder, IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {folder}")
    return dict(sorted(files.items()))
