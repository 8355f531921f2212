"""What the command-line entry points share: error reporting and one run directory for all ranks."""
from __future__ import annotations

import os
import sys
import time
from typing import Callable, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue

from segkit.errors import SegkitError

T = TypeVar("T")


def _run_stamp() -> str:
    """Time stamp naming the run directory, the same on every rank of one torchrun launch.

    Ranks start at slightly different times, so under torchrun the stamp is the start time of the
    launcher process they share (Linux /proc); multi-node runs should set hydra.run.dir explicitly.
    """
    started = time.time()
    if "LOCAL_WORLD_SIZE" in os.environ:
        try:
            with open(f"/proc/{os.getppid()}/stat") as f:
                ticks = int(f.read().rsplit(")", 1)[1].split()[19])
            with open("/proc/stat") as f:
                boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
            started = boot + ticks / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError, StopIteration):
            pass
    return time.strftime("%Y-%m-%d_%H-%M-%S", time.localtime(started))


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("segkit_run_stamp"):
        OmegaConf.register_new_resolver("segkit_run_stamp", _run_stamp, use_cache=True)


def run_cli(fn: Callable[[], T]) -> T:
    """Run ``fn``; an expected user error ends the command with its message and exit status 2
    (printed by rank 0 only); anything else keeps its traceback."""
    try:
        return fn()
    except (SegkitError, MissingMandatoryValue) as e:
        # MissingMandatoryValue: a ??? in the config (eval's checkpoint) the command line left empty.
        message = (f"the config needs a value for '{e.full_key}': pass {e.full_key}=..."
                   if isinstance(e, MissingMandatoryValue) else str(e))
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
