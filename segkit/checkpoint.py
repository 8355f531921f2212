"""Reading and writing checkpoint files safely.

Reads use ``weights_only=True`` (no arbitrary code from a pickled file) and turn every way a file can
be unusable into a :class:`CheckpointError` naming it. Writes go to a temporary file in the same
directory, are flushed to disk and renamed over the target, so a killed process never leaves a
truncated checkpoint behind.
"""
from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from segkit.errors import CheckpointError


def load_file(path: str | os.PathLike) -> Any:
    """``torch.load`` a local file on CPU with ``weights_only=True``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError) as e:
        raise CheckpointError(f"{path}: not a usable PyTorch checkpoint ({e})") from e


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` via a temporary file and an atomic rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
