"""COCO run-length encoding (RLE) of binary masks, as stored in COCO-style annotation files
(the Detail API's ``trainval_merged.json`` among them), decoded with numpy.

An RLE is ``{"size": [height, width], "counts": ...}``: alternating run lengths of 0s and 1s
(starting with 0s) over the mask in column-major order. ``counts`` is either a list of integers
(uncompressed) or pycocotools' compressed string: each run length, after the first two, stored as
the difference to the run length two before it, written as a sign-extended little-endian number
in 5-bit groups, one character ``chr(48 + group)`` each, bit 0x20 meaning "more groups follow".
The tests check this decoder against pycocotools.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

_MAX_GROUPS = 12  # 60 bits: more than any run length of an image


def counts_from_string(counts: str | bytes) -> np.ndarray:
    """Run lengths (int64) of a compressed COCO counts string; ValueError if it is malformed."""
    raw = counts.encode("ascii", errors="replace") if isinstance(counts, str) else bytes(counts)
    c = np.frombuffer(raw, dtype=np.uint8).astype(np.int64) - 48
    if c.size == 0:
        return np.zeros(0, dtype=np.int64)
    if ((c < 0) | (c > 63)).any():
        raise ValueError("compressed counts hold characters outside '0'..'o'")
    more = (c & 0x20) != 0
    if more[-1]:
        raise ValueError("compressed counts end in the middle of a number")
    ends = np.flatnonzero(~more)
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if lengths.max() > _MAX_GROUPS:
        raise ValueError("compressed counts hold a number too large for a run length")
    position = np.arange(c.size) - np.repeat(starts, lengths)
    values = np.add.reduceat((c & 0x1F) << (5 * position), starts)
    negative = (c[ends] & 0x10) != 0
    values[negative] -= np.left_shift(np.int64(1), 5 * lengths[negative])
    # Every run length after the first two is stored relative to the one two places before it.
    values[1::2] = np.cumsum(values[1::2])
    values[2::2] = np.cumsum(values[2::2])
    return values


def decode_rle(rle: Mapping[str, Any]) -> np.ndarray:
    """Boolean ``height x width`` mask of one RLE dict; ValueError (saying what is wrong) for a
    malformed one."""
    if not isinstance(rle, Mapping) or "counts" not in rle or "size" not in rle:
        raise ValueError("segmentation is not an RLE with 'counts' and 'size'")
    size = rle["size"]
    if (not isinstance(size, Sequence) or len(size) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in size)):
        raise ValueError(f"RLE size must be [height, width], got {size!r}")
    height, width = size
    counts = rle["counts"]
    if isinstance(counts, (str, bytes)):
        runs = counts_from_string(counts)
    elif isinstance(counts, Sequence) and all(isinstance(v, int) and not isinstance(v, bool) for v in counts):
        runs = np.asarray(counts, dtype=np.int64).reshape(-1)
    else:
        raise ValueError("RLE counts must be a compressed string or a list of integers")
    if (runs < 0).any():
        raise ValueError("RLE counts hold a negative run length")
    if runs.sum() != height * width:
        raise ValueError(f"RLE run lengths add up to {runs.sum()} pixels, not {height}x{width}")
    flat = np.repeat((np.arange(runs.size) % 2).astype(bool), runs)
    return flat.reshape(width, height).T
