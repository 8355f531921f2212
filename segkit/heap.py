"""The C heap's policy for large blocks: keep freed memory in the process for reuse.

glibc's malloc maps every block above a threshold (128 KiB, raised as blocks are freed, at most
32 MiB) as fresh pages and unmaps it on free, so each feature map of a forward or backward pass
(tens to hundreds of MiB on CPU) is paid for again in page faults: on the machines measured, as
much as filling the map once more, a fifth of a bf16 forward (bench/NOTES.md). The CUDA caching
allocator avoids this on GPUs; on CPU, PyTorch's tuning guide suggests jemalloc or tcmalloc. This
asks glibc itself to serve such blocks from its heap and keep freed memory there. The process's
resident memory then stays at its peak instead of falling between passes.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools

#: mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
#: Blocks up to this size come from the heap; larger ones are still mapped (and unmapped on free).
MMAP_THRESHOLD = 1 << 30
#: Free memory at the heap's top kept before it is returned to the system.
TRIM_THRESHOLD = (1 << 31) - 1


@functools.cache
def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse (once per process); False where the C
    library is not glibc or refuses the setting, which then changes nothing."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
