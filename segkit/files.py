"""Reading and writing files safely.

Reads of PyTorch files use ``weights_only=True`` (no arbitrary code from a pickled file) and turn
every way a file can be unusable into a :class:`CheckpointError` naming it. Writes go to a
temporary file in the same directory, are flushed to disk and renamed over the target, so a
killed process or a full disk never leaves a truncated file behind and never damages the
previous version; the temporary file is removed when the write fails.
"""
from __future__ import annotations

import errno
import os
import pickle
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

import torch

from segkit.errors import CheckpointError

TMP_SUFFIX = ".tmp"


def temporary_name(path: Path) -> Path:
    """Where :func:`write_atomic` writes ``path`` before renaming it (a hidden sibling)."""
    return path.with_name(f".{path.name}{TMP_SUFFIX}")


def write_atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write(f)`` on a temporary sibling of ``path``, then rename it over ``path``."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` atomically."""
    write_atomic(path, lambda f: torch.save(obj, f))


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_atomic(path, lambda f: f.write(text.encode()))


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append ``line`` and a newline to ``path`` in one ``write`` on an ``O_APPEND`` descriptor.

    A process killed during the append leaves the file without the line or with all of it; the
    rarer short write (a full disk) is taken back before the error is raised, so no half line is
    ever followed by another record. (A crash of the machine can still cut the last line short:
    readers drop such a line.)"""
    data = (line.rstrip("\n") + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        written = os.write(fd, data)
        if written != len(data):
            os.ftruncate(fd, os.fstat(fd).st_size - written)
            raise OSError(errno.ENOSPC, f"only {written} of {len(data)} bytes could be appended", str(path))
    finally:
        os.close(fd)


def remove_stale_temporaries(directory: Path, names: Iterable[str]) -> list[Path]:
    """Delete the temporaries a killed writer of ``names`` left in ``directory``; returns them."""
    stale = [temporary_name(directory / name) for name in names]
    stale = [p for p in stale if p.exists()]
    for p in stale:
        p.unlink()
    return stale


def load_file(path: str | os.PathLike) -> Any:
    """``torch.load`` a local file on CPU with ``weights_only=True``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError) as e:
        raise CheckpointError(f"{path}: not a usable PyTorch checkpoint ({_first_line(e)})") from e


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
