"""Reading and writing files safely.

Reads of PyTorch files use ``weights_only=True`` (no arbitrary code from a pickled file) and turn
every way a file can be unusable into a :class:`CheckpointError` naming it. Writes go to a
temporary file in the same directory, are flushed to disk and renamed over the target, so a
killed process or a full disk never leaves a truncated file behind and never damages the
previous version; the temporary file is removed when the write fails. Directories of files are
written the same way (:func:`write_dir_atomic`).

A write that fails for want of room or of a writable medium (a full disk or quota, a read-only or
failing file system, a file size limit) ends in :class:`~segkit.errors.WriteError`, one line naming
the file and the reason, whatever layer reported it: an ``OSError``, PyTorch's zip writer (a
``RuntimeError`` from ``inline_container.cc`` such as "unexpected pos", its way of saying that a
write came up short) or safetensors (the OS error in its message). Where the size is known up front
the free space is checked before anything is written.
"""
from __future__ import annotations

import errno
import hashlib
import os
import pickle
import re
import shutil
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from segkit.errors import CheckpointError, WriteError, first_line

TMP_SUFFIX = ".tmp"


def temporary_name(path: Path) -> Path:
    """Where :func:`write_atomic` writes ``path`` before renaming it (a hidden sibling)."""
    return path.with_name(f".{path.name}{TMP_SUFFIX}")


#: errno values that say the medium cannot take the file, not that the path is wrong.
WRITE_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                errno.EROFS: "read-only file system", errno.EIO: "input/output error",
                errno.EFBIG: "file too large (a file size limit: ulimit -f?)"}
# PyTorch's zip writer (torch.save, torch.jit.save) raises RuntimeError("[enforce fail at
# inline_container.cc:...] ... unexpected pos A vs B") when the OS takes fewer bytes than it wrote.
_ZIP_WRITER = ("inline_container.cc", "PytorchStreamWriter")
# safetensors (Rust) puts the OS error in its SafetensorError's message: "... (os error 28)".
_OS_ERROR = re.compile(r"os error (\d+)")


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _free_bytes(path: Path) -> int | None:
    """Bytes free to this user on the file system ``path`` (a file that may not exist yet) is on."""
    directory = path.parent
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return None


def check_free_space(path: str | os.PathLike, needed: int) -> None:
    """WriteError naming ``path`` when its file system has fewer than ``needed`` bytes free."""
    path = Path(path)
    free = _free_bytes(path)
    if free is not None and free < needed:
        raise WriteError(path, f"it needs about {_size(needed)} but only {_size(free)} are free on its file "
                               f"system; free some space or write elsewhere")


def write_failure(e: BaseException, path: str | os.PathLike, needed: int | None = None) -> WriteError | None:
    """``e`` as a WriteError naming ``path`` when it says that the medium could not take the file
    (see :data:`WRITE_ERRNOS`, the zip writer's and safetensors' reports); None for any other error.
    ``needed``: the file's size where known."""
    path = Path(path)
    code = e.errno if isinstance(e, OSError) else None
    match = _OS_ERROR.search(str(e)) if type(e).__module__.startswith("safetensors") else None
    if match:
        code = int(match.group(1))
    if code in WRITE_ERRNOS:
        reason = WRITE_ERRNOS[code]
    elif isinstance(e, RuntimeError) and any(marker in str(e) for marker in _ZIP_WRITER):
        reason = f"the write came up short ({first_line(e)})"
    else:
        return None
    free = _free_bytes(path)
    if free is not None and code in (None, errno.ENOSPC, errno.EDQUOT):
        reason += f"; {_size(free)} free on its file system" + (f", about {_size(needed)} needed" if needed else "")
    return WriteError(path, reason)


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensor storages in ``obj`` (nested dicts, lists and tuples), each counted once:
    about the size ``torch.save`` or safetensors writes."""
    storages: dict[tuple[int, int], int] = {}

    def visit(o: Any) -> None:
        if isinstance(o, torch.Tensor):
            storage = o.untyped_storage()
            storages[storage.data_ptr(), storage.nbytes()] = storage.nbytes()
        elif isinstance(o, dict):
            for v in o.values():
                visit(v)
        elif isinstance(o, (list, tuple)):
            for v in o:
                visit(v)

    visit(obj)
    return sum(storages.values())


def write_atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], None], size: int | None = None,
                 sync: bool = True, tmp: Path | None = None) -> None:
    """Call ``write(f)`` on a temporary sibling of ``path`` (``tmp``; default :func:`temporary_name`),
    then rename it over ``path``. ``size``: the bytes ``write`` writes, if known (the free space is
    checked first); ``sync``: fsync before the rename (a crash of the machine then leaves the old
    or the new file, not an empty one). A medium that cannot take the file raises WriteError;
    ``path`` is then as it was and the temporary file is gone."""
    path = Path(path)
    tmp = temporary_name(path) if tmp is None else tmp
    if size is not None:
        check_free_space(path, size)
    try:
        with open(tmp, "wb") as f:
            write(f)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as e:  # noqa: BLE001 - a full disk becomes WriteError, the rest goes on as it was
        failure = write_failure(e, path, size)
        if failure is None:
            raise
        raise failure from e
    finally:
        tmp.unlink(missing_ok=True)


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` atomically (the free space checked against its tensors' bytes)."""
    write_atomic(path, lambda f: torch.save(obj, f), size=tensor_bytes(obj))


def write_bytes_atomic(path: str | os.PathLike, data: bytes, sync: bool = True, tmp: Path | None = None) -> None:
    """``data`` to ``path`` atomically (see :func:`write_atomic`)."""
    write_atomic(path, lambda f: f.write(data), size=len(data), sync=sync, tmp=tmp)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append ``line`` and a newline to ``path`` in one ``write`` on an ``O_APPEND`` descriptor.

    A process killed during the append leaves the file without the line or with all of it; the
    rarer short write (a full disk) is taken back before the error is raised, so no half line is
    ever followed by another record. (A crash of the machine can still cut the last line short:
    readers drop such a line.)"""
    data = (line.rstrip("\n") + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        try:
            written = os.write(fd, data)
        except OSError as e:
            failure = write_failure(e, path, len(data))
            if failure is None:
                raise
            raise failure from e
        if written != len(data):
            os.ftruncate(fd, os.fstat(fd).st_size - written)
            raise WriteError(path, f"only {written} of {len(data)} bytes could be appended (a full disk?); "
                                   f"the partial line was taken back")
    finally:
        os.close(fd)


def sha256_file(path: str | os.PathLike) -> str:
    """The hex sha256 of a file, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def remove_stale_temporaries(directory: Path, names: Iterable[str]) -> list[Path]:
    """Delete the temporaries a killed writer of ``names`` left in ``directory``; returns them."""
    stale = [temporary_name(directory / name) for name in names]
    stale = [p for p in stale if p.exists()]
    for p in stale:
        p.unlink()
    return stale


def write_dir_atomic(path: str | os.PathLike, fill: Callable[[Path], None], size: int | None = None) -> None:
    """Call ``fill(tmp)`` on a new hidden sibling directory of ``path``, then put it in place of
    ``path`` (an existing ``path`` is replaced): ``path`` is either complete or as it was, never
    half written. The caller decides whether an existing ``path`` may be replaced. ``size``: about
    the bytes ``fill`` writes, if known (the free space is checked first). A medium that cannot
    take a file raises WriteError naming the file as it would be inside ``path``."""
    path = Path(path)
    tmp, old = (path.with_name(f".{path.name}.{os.getpid()}.{kind}") for kind in ("tmp", "old"))
    for stale in (tmp, old):
        shutil.rmtree(stale, ignore_errors=True)
    if size is not None:
        check_free_space(path, size)

    def final(name: object) -> Path:
        """The path in ``path`` of a file named inside ``tmp``."""
        name = Path(str(name))
        return path / name.relative_to(tmp) if name.is_relative_to(tmp) else name

    try:
        tmp.mkdir(parents=True)
        fill(tmp)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    except WriteError as e:
        raise WriteError(final(e.path), e.reason) from e
    except Exception as e:  # noqa: BLE001 - a full disk becomes WriteError, the rest goes on as it was
        named = getattr(e, "filename", None)
        failure = write_failure(e, final(named) if named else path, size)
        if failure is None:
            raise
        raise failure from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def _float64_dtype(*args: Any) -> np.dtype:
    dtype = np.dtype(*args)
    if dtype != np.float64:
        raise pickle.UnpicklingError(f"numpy dtype {dtype} is not allowed here (only float64 scalars)")
    return dtype


_multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
#: What a pickled numpy float64 scalar needs, and nothing more: PyTorch-Encoding's training
#: checkpoints (``checkpoint.pth.tar``) hold ``best_pred`` as one. Its reconstructor is named
#: ``numpy.core...`` in files written under numpy 1 and ``numpy._core...`` under numpy 2; the dtype
#: constructor accepts float64 only.
NUMPY_FLOAT64_GLOBALS = [(_float64_dtype, "numpy.dtype"), type(np.dtype(np.float64)),
                         (_multiarray.scalar, "numpy.core.multiarray.scalar"),
                         (_multiarray.scalar, "numpy._core.multiarray.scalar")]


def load_file(path: str | os.PathLike) -> Any:
    """``torch.load`` a local file on CPU with ``weights_only=True`` (numpy float64 scalars allowed)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        with torch.serialization.safe_globals(NUMPY_FLOAT64_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError) as e:
        raise CheckpointError(f"{path}: not a usable PyTorch checkpoint ({first_line(e)})") from e
