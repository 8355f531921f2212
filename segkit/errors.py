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
