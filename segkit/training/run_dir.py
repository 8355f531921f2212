"""A training run's directory: who owns it, and the records rank 0 keeps in it.

One run at a time owns a directory: rank 0 holds an exclusive ``flock`` on ``.lock`` (released by the
kernel when the process ends, however it ends), and the file names the holder. A fresh run refuses
a directory that holds any earlier run's records; a resumed run drops the records of iterations
after its checkpoint, so the log reads as one run. Temporaries a killed writer left behind are
removed when the next run takes the directory.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import IO, Any

import numpy as np
from tqdm import tqdm

from segkit.errors import ConfigError
from segkit.files import append_line, remove_stale_temporaries, write_text_atomic
from segkit.records import read_metrics

#: What a run writes; any of them marks a directory as holding an earlier run.
RECORDS = ("last.pt", "best.pt", "metrics.jsonl", "config.yaml", "train.log", "tb")
LOCK = ".lock"


def earlier_records(run_dir: Path) -> list[str]:
    return [name for name in RECORDS if (run_dir / name).exists()]


class RunLock:
    """An exclusive lock on ``run_dir/.lock`` naming its holder (POSIX ``flock``)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        import fcntl  # POSIX; the lock is what keeps two runs out of one directory

        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise ConfigError(f"{self.path.parent} is in use by another run ({holder}); wait for it to end "
                              f"or pick another hydra.run.dir") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                f"{' '.join(sys.argv)}\n")
        f.flush()
        self._file = f

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the flock
            self._file = None


class RunRecords:
    """Rank 0's records: ``config.yaml``, ``metrics.jsonl``, ``train.log`` (the console's lines
    without the progress bar) and TensorBoard events under ``tb/``."""

    def __init__(self, run_dir: Path, config_yaml: str, start_iter: int) -> None:
        self.run_dir = run_dir
        self.metrics = run_dir / "metrics.jsonl"
        self.text_log = run_dir / "train.log"
        write_text_atomic(run_dir / "config.yaml", config_yaml)
        self._drop_after(start_iter)
        from torch.utils.tensorboard import SummaryWriter  # slow import: only where records are written

        self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=start_iter)

    def _drop_after(self, iteration: int) -> None:
        """A resumed run repeats the iterations after its checkpoint: forget their old records (and
        a last line a crash cut short), so that appends continue a clean file."""
        if not self.metrics.exists():
            return
        kept = [record for record in read_metrics(self.metrics) if record["iter"] <= iteration]
        write_text_atomic(self.metrics, "".join(json.dumps(record) + "\n" for record in kept))

    def log(self, record: dict[str, Any]) -> None:
        append_line(self.metrics, json.dumps(record))
        for key, value in record.items():
            if key not in ("iter", "epoch", "split") and isinstance(value, (int, float)):
                self.tb.add_scalar(f"{record.get('split', 'train')}/{key}", value, record["iter"])

    def say(self, line: str) -> None:
        """A line for the console (above the progress bar) and for ``train.log``."""
        tqdm.write(line)
        with open(self.text_log, "a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")

    def add_images(self, tag: str, images: list[np.ndarray], iteration: int) -> None:
        """HxWx3 uint8 pictures under ``tag/0``, ``tag/1``, ... at ``iteration``."""
        for i, image in enumerate(images):
            self.tb.add_image(f"{tag}/{i}", image, iteration, dataformats="HWC")

    def close(self) -> None:
        self.tb.close()


def _refuse_earlier_records(run_dir: Path) -> None:
    found = earlier_records(run_dir)
    if found:
        raise ConfigError(f"{run_dir} already holds an earlier run ({', '.join(found)}); continue it with "
                          f"resume=true, or pick another hydra.run.dir")


def take_run_dir(run_dir: Path, resuming: bool) -> RunLock:
    """Create and lock ``run_dir`` for this run (rank 0), refusing another run's records (checked
    before the lock too, so that a refused run leaves the directory as it was)."""
    if not resuming:
        _refuse_earlier_records(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"hydra.run.dir={run_dir} is a file, not a directory; pick another hydra.run.dir") from None
    lock = RunLock(run_dir)
    lock.acquire()
    if not resuming:
        try:
            _refuse_earlier_records(run_dir)  # again: another run may have started in between
        except ConfigError:
            lock.release()
            raise
    remove_stale_temporaries(run_dir, ("last.pt", "best.pt", "metrics.jsonl", "config.yaml"))
    return lock
