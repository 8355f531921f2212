"""``segkit-train --nproc-per-node=N ...`` (and ``segkit-eval``, ``train_seg.py``, ``eval_seg.py``): the
command on N ranks of this machine, ending as one process would.

It runs ``torch.distributed.run`` (torchrun) in this process with ``--standalone``, on this very
command line less the option. The ranks print their own one-line errors (:mod:`segkit.reporting`:
each distinct message once, naming its rank), so the launcher adds nothing to them: torchrun's
log lines and its failure report (a ``ChildFailedError`` or ``SignalException`` traceback, exit
status 1) are left out. The exit status is the first failing rank's: 2 for an expected error,
128 + N for a signal (130 after Ctrl-C, 143 after SIGTERM); a rank killed without a word (the
out-of-memory killer) gets one line here. Plain ``torchrun`` keeps working as before.
"""
from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Sequence
from typing import NoReturn

from segkit.training.interrupt import exit_status, signal_name

OPTION = "--nproc-per-node"
_OPTION = re.compile(r"^--nproc[-_]per[-_]node(?:=(.*))?$")
#: ``--nproc-per-node`` values besides a count (torchrun's: one rank per GPU, per CPU, or either).
DEVICE_VALUES = ("auto", "cpu", "gpu")
#: torchrun's loggers: its progress and failure lines, which the ranks' own lines make redundant.
_LOGGERS = ("torch.distributed.elastic", "torch.distributed.launcher", "torch.distributed.run")


def split_option(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """(the ``--nproc-per-node`` value or None, the other arguments) of a command line (without
    the program name); ``--nproc_per_node`` and ``--nproc-per-node N`` are read too."""
    value, rest, args = None, [], list(argv)
    while args:
        arg = args.pop(0)
        m = _OPTION.match(arg)
        if m is None:
            rest.append(arg)
        elif m.group(1) is not None:
            value = m.group(1)
        else:
            value = args.pop(0) if args else ""
    return value, rest


def _say(line: str) -> None:
    try:
        print(line, file=sys.stderr, flush=True)
    except OSError:
        pass


def _fail(line: str, status: int = 2) -> NoReturn:
    _say(f"error: {line}")
    sys.exit(status)


def _failure_status(error: BaseException) -> int:
    """The exit status of torchrun's ChildFailedError: its first failure's; a rank that died by a
    signal without writing why is told in one line here."""
    rank, failure = error.get_first_failure()
    if failure.exitcode >= 0:
        return failure.exitcode or 1
    signum = -failure.exitcode
    if not isinstance(failure.error_file_data, dict) or "message" not in failure.error_file_data:
        hint = " (the out-of-memory killer?)" if signum == 9 else ""
        _say(f"error: rank {rank} (pid {failure.pid}) was killed by {signal_name(signum)}{hint}")
    return exit_status(signum)


def launch(nproc: str, script: str, args: Sequence[str]) -> NoReturn:
    """Run ``python script *args`` on ``nproc`` ranks of this machine under torchrun and exit as
    one process would (see the module's description)."""
    if not (nproc.isdigit() and int(nproc) >= 1) and nproc not in DEVICE_VALUES:
        _fail(f"{OPTION}={nproc!r} is invalid: expected a number of ranks >= 1 or one of {', '.join(DEVICE_VALUES)}")
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # Each of torchrun's modules sets its own logger's level: quiet them one by one.
    for name in list(logging.Logger.manager.loggerDict):
        if name.startswith(_LOGGERS):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        run(parse_args(["--standalone", f"--nproc-per-node={nproc}", script, *args]))
    except ChildFailedError as e:
        sys.exit(_failure_status(e))
    except SignalException as e:  # the ranks, signalled too, said where they stopped
        sys.exit(exit_status(e.sigval))
    sys.exit(0)


def maybe_launch(argv: Sequence[str]) -> None:
    """Launch ``argv`` (``sys.argv``) on several ranks when it asks for it with ``--nproc-per-node``;
    return otherwise (also inside a rank: torchrun has already launched it)."""
    nproc, rest = split_option(argv[1:])
    if nproc is None:
        return
    if "LOCAL_RANK" in os.environ:
        _fail(f"{OPTION} inside a launched rank: run the command itself with {OPTION}, or under torchrun without it")
    launch(nproc, argv[0], rest)
