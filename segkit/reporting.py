"""Which rank tells the user that a multi-rank run failed, and what the launcher is told.

The rank that hits an error reports it; the others, whose next collective then fails ("Connection
closed by peer"), stay quiet. Ranks learn of each other's failures through the process group's
key-value store (under torchrun it lives in the launcher, so it outlives any rank): the first
failing rank records its message there with an atomic compare-and-set. A rank whose own error
is the same message (a data error every rank hits) stays quiet too; a different one is printed.

Under torchrun, the reporting rank also writes its line to the error file torchrun names
(``TORCHELASTIC_ERROR_FILE``), so the launcher's own failure summary shows it as the root cause
instead of "To enable traceback see ...".
"""
from __future__ import annotations

import json
import os
import time
import traceback
from datetime import timedelta

import torch.distributed as dist

from segkit import distributed

_KEY = "segkit/first_failure"
# What gloo and NCCL say when the other end of a collective is gone.
_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Connection refused",
              "communicator was aborted", "NCCL error", "Timed out", "timed out", "Socket Timeout")


def _store() -> dist.Store | None:
    if not distributed.is_dist():
        return None
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        store = _get_default_store()
        store.set_timeout(timedelta(seconds=10))  # never wait long on a store that may be gone
        return store
    except Exception:  # noqa: BLE001 - no store (or a private API that moved): report as if alone
        return None


def claim(message: str) -> bool:
    """Record that this rank failed with ``message``; True when this rank should print it (the
    first to fail, or failing with another message than the first)."""
    store = _store()
    if store is None:
        return True
    mine = f"{distributed.get_rank()}\n{message}"
    try:
        first = store.compare_set(_KEY, "", mine).decode(errors="replace")
    except Exception:  # noqa: BLE001 - the store is gone with its host: say it anyway
        return True
    return first == mine or first.split("\n", 1)[-1] != message


def first_failure() -> tuple[int, str] | None:
    """(rank, message) of the first failure a rank recorded; None when there is none. (-1, "")
    when the store cannot be reached: its host is gone (rank 0, outside torchrun), and that rank's
    end is the cause, reported by it or by the launcher."""
    store = _store()
    if store is None:
        return None
    try:
        if not store.check([_KEY]):
            return None
        rank, message = store.get(_KEY).decode(errors="replace").split("\n", 1)
        return int(rank), message
    except Exception:  # noqa: BLE001
        return -1, ""


def is_lost_peer(e: BaseException) -> bool:
    """True for the error a collective raises when another rank is gone (or hangs)."""
    if not distributed.is_dist() or not isinstance(e, RuntimeError):
        return False
    return isinstance(e, dist.DistError) or any(s in str(e) for s in _PEER_LOST)


def write_error_file(line: str, with_traceback: bool = False) -> None:
    """Tell torchrun why this rank fails, as its ``@record`` decorator would (the launcher shows the
    first failing rank's file in its summary)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    info = {"timestamp": str(int(time.time()))}
    if with_traceback:
        info["py_callstack"] = traceback.format_exc()
    try:
        with open(path, "w") as f:
            json.dump({"message": {"message": line, "extraInfo": info}}, f)
    except OSError:
        pass
