"""Stopping a training run cleanly: on a signal, and when the launcher is gone.

* :class:`StopSignals` turns SIGINT (Ctrl-C) and SIGTERM, and under SLURM its ``--signal`` signals
  SIGUSR1/SIGUSR2, into a request that the training loop honours after the current optimizer step:
  every rank learns of it through the step's loss all_reduce, so all stop after the same step, and
  rank 0 writes ``last.pt``. After a Ctrl-C, a second Ctrl-C (or a SIGTERM, which is what torchrun
  forwards on a second Ctrl-C) ends the process at once; files stay whole because every write of
  ``last.pt``, ``best.pt`` and ``config.yaml`` is atomic and ``metrics.jsonl`` takes whole lines. A
  signal after a SIGTERM or a SLURM signal is ignored: the scheduler will kill the process at its
  own deadline, and an earlier exit would only lose the checkpoint being written.
* :func:`watch_parent` stops a torchrun rank whose launcher died (it would otherwise train on,
  unsupervised): a watchdog thread polls the parent pid, sends the process SIGTERM (the path above)
  and, should that not end it within :data:`ORPHAN_GRACE_S` seconds, exits at once.
* :func:`resume_command` is the command that continues an interrupted run.

This module uses the standard library only.
"""
from __future__ import annotations

import functools
import os
import shlex
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

#: Seconds a rank whose launcher died has to stop by itself before it exits at once.
ORPHAN_GRACE_S = 20.0
#: How often the watchdog looks at the parent pid.
ORPHAN_POLL_S = 0.5


def exit_status(signum: int) -> int:
    """The shell's convention for "ended by signal ``signum``": 130 for SIGINT, 143 for SIGTERM."""
    return 128 + signum


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _say(line: str, own_line: bool = False) -> None:
    """One line on stderr with a single write (safe inside a signal handler, whatever the main
    thread was printing); a closed stderr (the launcher is gone) is not an error. ``own_line``:
    start a new line on a terminal first (off a progress bar, and the ``^C`` the terminal echoed)."""
    try:
        start = "\n" if own_line and os.isatty(2) else ""
        os.write(2, (start + line.rstrip("\n") + "\n").encode(errors="replace"))
    except OSError:
        pass


class Interrupted(Exception):
    """Training stopped on a signal after ``iteration`` steps, with ``checkpoint`` written.

    Not a :class:`~segkit.errors.SegkitError`: the command ends with ``exit_status`` (128 + signal),
    not 2."""

    def __init__(self, signum: int, iteration: int, total: int, checkpoint: Path, note: str | None = None) -> None:
        self.signum, self.iteration, self.total, self.checkpoint, self.note = signum, iteration, total, checkpoint, note
        super().__init__(self.describe())

    @property
    def exit_status(self) -> int:
        return exit_status(self.signum)

    def describe(self) -> str:
        note = f"; {self.note}" if self.note else ""
        return (f"{signal_name(self.signum)}: stopped at iteration {self.iteration} of {self.total}, "
                f"saved {_display_path(self.checkpoint)}{note}. Continue with: "
                f"{resume_command(self.checkpoint.parent)}")


def _scheduler_signals() -> tuple[str, ...]:
    # SLURM's --signal (submitit sends SIGUSR2 before the time limit and on preemption); outside SLURM
    # these signals keep their default meaning.
    return ("SIGUSR1", "SIGUSR2") if "SLURM_JOB_ID" in os.environ else ()


class StopSignals:
    """While active (a context manager, in the main thread), stop signals set :attr:`signum`
    instead of ending the process; the training loop polls :attr:`requested`.

    ``announce``: print a line when the first signal arrives (rank 0). ``forced``: what to say when
    a second Ctrl-C ends the process at once (which checkpoint is on disk). ``failed_status``: when
    the block is left by an error other than :class:`Interrupted`, a later SIGTERM ends the process
    at once with this status instead of killing it: torchrun stops the other ranks of a failed
    launch with SIGTERM, and they fail with the run (status 2), whatever they are doing then.
    """

    def __init__(self, announce: bool = True, forced: Callable[[], str] | None = None,
                 failed_status: int | None = None) -> None:
        self.signum: int | None = None
        self.announce = announce
        self.forced = forced
        self.failed_status = failed_status
        self._previous: dict[int, Any] = {}
        self._pid = os.getpid()

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():
            return self  # Python delivers signals to the main thread only; leave them alone
        self._pid = os.getpid()
        for name in ("SIGINT", "SIGTERM", *_scheduler_signals()):
            sig = getattr(signal, name, None)
            if sig is not None:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)
        if (self._previous and self.failed_status is not None and exc_type is not None
                and not issubclass(exc_type, Interrupted)):
            signal.signal(signal.SIGTERM, self._exit_failed)
        self._previous.clear()

    def _exit_failed(self, signum: int, frame: FrameType | None) -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - a closed stream must not keep the process alive
                pass
        os._exit(self.failed_status if self.failed_status is not None else exit_status(signum))

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._pid:
            return  # a forked DataLoader worker (Ctrl-C reaches the whole process group): the main process decides
        if self.signum is None:
            self.signum = signum
            if self.announce:
                again = "; press Ctrl-C again to stop at once" if signum == signal.SIGINT else ""
                _say(f"{signal_name(signum)}: stopping after the current step and writing last.pt{again}", True)
            return
        if self.signum == signal.SIGINT and signum in (signal.SIGINT, signal.SIGTERM):
            if self.announce:
                saved = self.forced() if self.forced is not None else ""
                _say(f"{signal_name(signum)} again: stopped at once{'; ' + saved if saved else ''}", True)
            os._exit(exit_status(signum))

    def chain(self) -> str | None:
        """Hand the signal on to the handler it had before, where that is submitit's (SLURM): its
        handler requeues the job (on global rank 0). Call once ``last.pt`` is written; returns what
        happened, in words, or None when there was nothing to hand on."""
        previous = self._previous.get(self.signum) if self.signum is not None else None
        owner = getattr(previous, "__self__", None)
        if owner is None or not type(owner).__module__.startswith("submitit") or previous.__name__ == "bypass":
            return None
        try:
            previous(self.signum, None)
        except SystemExit:  # submitit exits once it has requeued; this process ends in its own way
            return "the SLURM job is requeued"
        except Exception as e:  # noqa: BLE001 - submitit says why it did not requeue
            return f"the SLURM job is not requeued ({e})"
        return None


def watch_parent(rank: int | None = None) -> threading.Thread | None:
    """Under torchrun, start a daemon thread that stops this process when its launcher dies.

    The launcher starts every rank in a session of its own, so nothing else would tell the rank:
    it would train on, unsupervised. The thread polls the parent pid (portable, and unlike
    ``PR_SET_PDEATHSIG`` not tied to the thread that spawned the process), then sends this process
    SIGTERM: a training loop stops after the current step and writes ``last.pt``; elsewhere the
    process ends as SIGTERM ends it. Should it still run after :data:`ORPHAN_GRACE_S`, it exits at once.
    """
    _launcher_prefix()  # read the launcher's command line while it is there, for resume_command
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None  # a plain process: a closed terminal or nohup must not stop it
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(ORPHAN_POLL_S)
        if rank == 0:
            _say(f"warning: the launcher (pid {parent}) is gone: stopping every rank")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(ORPHAN_GRACE_S)
        _say(f"error: [rank {rank}] the launcher is gone and this rank did not stop within "
             f"{ORPHAN_GRACE_S:.0f} s: exiting now (checkpoints on disk are whole: writes are atomic)")
        os._exit(exit_status(signal.SIGTERM))

    thread = threading.Thread(target=watch, name="segkit-parent-watchdog", daemon=True)
    thread.start()
    return thread


# -- the command that continues a run ---------------------------------------------------------
def _cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    args = [a.decode(errors="surrogateescape") for a in raw.split(b"\0")]
    return args[:-1] if args and args[-1] == "" else args


@functools.cache
def _launcher_prefix() -> tuple[str, ...]:
    """What ran this script: the interpreter and its options (``python -u``), or the torchrun
    command line with its options, as typed (Linux /proc), else a reconstruction. Read once: a
    rank whose launcher died has another parent."""
    return tuple(_read_launcher_prefix())


def _read_launcher_prefix() -> list[str]:
    torchrun = "TORCHELASTIC_RUN_ID" in os.environ
    full = _cmdline(os.getppid() if torchrun else os.getpid())
    if full:
        for i in range(len(full) - len(sys.argv), -1, -1):
            if full[i:] == sys.argv:
                prefix = full[:i]
                break
        else:
            prefix = None
        if prefix is not None:
            # `torchrun` and console scripts run through their shebang: show them as typed.
            if len(prefix) >= 2 and Path(prefix[1]).name == "torchrun":
                prefix = ["torchrun", *prefix[2:]] if shutil.which("torchrun") == prefix[1] else prefix[1:]
            elif not torchrun and len(prefix) == 1 and not sys.argv[0].endswith(".py") and os.access(sys.argv[0], os.X_OK):
                prefix = []
            return prefix
    if torchrun:
        return ["torchrun", f"--nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', '1')}"]
    return [] if not sys.argv[0].endswith(".py") else [Path(sys.executable).name]


def _display_path(path: Path) -> str:
    """``path`` relative to the working directory when it lies below it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _is_override(arg: str, key: str) -> bool:
    return arg.lstrip("+").split("=", 1)[0] == key and "=" in arg


def resume_command(run_dir: Path) -> str:
    """This command line again, continuing ``run_dir``: its own ``resume`` and ``hydra.run.dir``
    overrides are replaced by ``hydra.run.dir=RUN_DIR resume=true`` (a default run directory is
    time-stamped, so the same command would otherwise start a new one)."""
    args = [a for a in sys.argv[1:] if not (_is_override(a, "resume") or _is_override(a, "hydra.run.dir"))]
    prefix, script = list(_launcher_prefix()), sys.argv[0]
    if not prefix and shutil.which(Path(script).name) == script:
        script = Path(script).name  # a console script on PATH (segkit-train)
    return shlex.join([*prefix, script, *args, f"hydra.run.dir={_display_path(run_dir)}", "resume=true"])
