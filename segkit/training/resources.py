"""Running out of memory, said in a way that tells the user what to change.

A DataLoader worker killed by a signal (the out-of-memory killer's SIGKILL, a bus error from a
full ``/dev/shm``) or an out-of-memory error (CUDA's, the CPU allocator's, ``MemoryError``) ends a
run with a message naming the likely cause, the settings that help with their current values,
and the checkpoint on disk. Other errors are not this module's: :func:`explain` returns None.
"""
from __future__ import annotations

import re
from pathlib import Path

from segkit.errors import first_line, is_out_of_memory
from segkit.settings import TrainJob
from segkit.training.interrupt import resume_command

# torch's two reports: "DataLoader worker (pid 123) is killed by signal: Killed." (its SIGCHLD
# handler) and "DataLoader worker (pid(s) 123, 124) exited unexpectedly" (a queue timeout).
_WORKER_KILLED = re.compile(r"DataLoader worker \(pid(?:\(s\))? ([\d, ]+)\) (?:is killed by signal: ([^.\n]+)|exited unexpectedly)")


def worker_failure(e: BaseException) -> tuple[str, str | None] | None:
    """(pids, signal description or None) when ``e`` is torch's report of a DataLoader worker that
    died without raising (killed by a signal, or exited without a word)."""
    if not isinstance(e, RuntimeError):
        return None
    m = _WORKER_KILLED.search(str(e))
    return (m.group(1).strip(), m.group(2)) if m else None


def checkpoint_state(run_dir: Path, last_saved: int | None, ckpt_every: int) -> str:
    """What is on disk to continue from, and how, in words."""
    if last_saved is None:
        return f"no last.pt was written yet (one is written every train.ckpt_every={ckpt_every} iterations)"
    return f"last.pt is intact at iteration {last_saved}; continue with: {resume_command(run_dir)}"


def explain(e: BaseException, job: TrainJob, run_dir: Path, last_saved: int | None) -> str | None:
    """The one-line message for a resource failure, or None for any other error. ``last_saved``:
    the iteration ``run_dir/last.pt`` holds (None when there is none)."""
    t, crop = job.train, job.dataset.crop_size
    saved = checkpoint_state(run_dir, last_saved, t.ckpt_every)
    amp = f"train.amp=bf16 (now {t.amp or 'fp32'})"
    worker = worker_failure(e)
    if worker is not None:
        pids, how = worker
        if how and "bus error" in how.lower():
            cause = (f"a DataLoader worker (pid {pids}) was killed by a bus error: shared memory (/dev/shm) "
                     f"ran out; give the container more shared memory or lower train.workers (now {t.workers})")
        else:
            died = f"was killed by signal: {how}" if how else "exited unexpectedly"
            cause = (f"a DataLoader worker (pid {pids}) {died}, most likely by the out-of-memory killer; "
                     f"lower train.workers (now {t.workers}), train.batch_size (now {t.batch_size}) or "
                     f"dataset.crop_size (now {crop}); {amp} also lowers the memory of the training step")
        return f"{cause}; {saved}"
    if is_out_of_memory(e):
        return (f"out of memory ({first_line(e)}): lower train.batch_size (now {t.batch_size}), raise "
                f"train.accum_steps (now {t.accum_steps}: the same total batch in smaller pieces) or lower "
                f"dataset.crop_size (now {crop}), or use {amp}; fewer train.workers (now {t.workers}) frees "
                f"host memory; {saved}")
    return None
