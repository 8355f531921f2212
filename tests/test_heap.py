"""keep_freed_memory: glibc's malloc keeps freed large blocks in the process (no fresh pages, and
their page faults, for the next feature map of the same size), where by default it returns them."""
import subprocess
import sys
import textwrap

import pytest

from segkit.heap import keep_freed_memory

# A 256 MiB block written through, freed, then the resident memory read: by default glibc maps such
# a block and unmaps it on free; after keep_freed_memory() it stays in the heap for the next one.
PROBE = textwrap.dedent("""
    import ctypes, sys
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    def resident_mib():
        return int(open("/proc/self/statm").read().split()[1]) * 4096 // 2**20
    def after_free():
        block = libc.malloc(256 << 20)
        ctypes.memset(block, 1, 256 << 20)
        libc.free(block)
        return resident_mib()
    before = resident_mib()
    default = after_free() - before
    if sys.argv[1] == "keep":
        from segkit.heap import keep_freed_memory
        assert keep_freed_memory()
    print(default, after_free() - before)
""")


def kept_mib(mode: str) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    default, then = out.stdout.split()
    return int(default), int(then)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_blocks_stay_in_the_process_only_when_asked():
    assert keep_freed_memory() is True and keep_freed_memory() is True  # once per process
    default, unchanged = kept_mib("default")
    assert default < 64 and unchanged < 64  # returned to the system on free
    default, kept = kept_mib("keep")
    assert default < 64 and kept >= 256
