"""Errors that mean "the user asked for something we cannot do" rather than "segkit is broken".

The command-line entry points catch :class:`SegkitError` and print its message without a
traceback (exit status 2); anything else keeps its traceback.
"""


class SegkitError(Exception):
    """An expected user error: bad config value, missing or malformed data, unusable checkpoint."""


class ConfigError(SegkitError):
    """A configuration key or value is invalid."""


class DataError(SegkitError):
    """A dataset is missing, incomplete or malformed."""


class CheckpointError(SegkitError):
    """A checkpoint or weights file cannot be read or does not fit the model."""


class ExportError(SegkitError):
    """An exported model does not reproduce the original's outputs."""


class WriteError(SegkitError):
    """A file could not be written (full disk, quota, read-only or failing medium); ``path`` is the
    file the user would look for, ``reason`` says why."""

    def __init__(self, path: object, reason: str) -> None:
        self.path, self.reason = path, reason
        super().__init__(f"cannot write {path}: {reason}")


class OutOfResources(SegkitError):
    """Memory ran out (an out-of-memory error, or a DataLoader worker killed by a signal); the
    message names the settings that help."""


#: What the CPU allocator, CUDA and the rest say when memory runs out.
_OUT_OF_MEMORY = ("out of memory", "can't allocate memory", "cannot allocate memory")


def is_out_of_memory(e: BaseException) -> bool:
    """True for an out-of-memory error (CUDA's, the CPU allocator's, ``MemoryError``)."""
    if isinstance(e, MemoryError):
        return True
    import torch  # here: the rest of this module needs nothing

    if isinstance(e, torch.OutOfMemoryError):
        return True
    return isinstance(e, RuntimeError) and any(s in str(e).lower() for s in _OUT_OF_MEMORY)


def first_line(e: BaseException) -> str:
    """The first non-empty line of an error's message (its type's name when it has none)."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__
