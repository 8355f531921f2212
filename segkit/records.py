"""A training run's ``metrics.jsonl``, read: by a resumed run (:mod:`segkit.training.run_dir`) and by
the evaluation report (its validation curve), which sits below training."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from segkit.errors import ConfigError


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``.

    Records are appended whole (:func:`~segkit.files.append_line`), so only the last line can be
    damaged, by a crash of the machine during an append: it is dropped with a warning. Any other
    line that is not a record is an error naming it (something else changed the file).
    """
    lines = path.read_text(errors="replace").split("\n")
    while lines and not lines[-1].strip("\0 \t\r"):
        lines.pop()  # the file's final newline, or the zeros a crash can leave after it
    records: list[dict[str, Any]] = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("iter"), int):
                raise ValueError("not a record with an 'iter'")
        except ValueError as e:
            if number == len(lines):
                shown = line if len(line) <= 80 else line[:77] + "..."
                print(f"warning: {path}: dropped its last line, cut short by a crash during an append: "
                      f"{shown!r}", file=sys.stderr)
                break
            raise ConfigError(f"{path}, line {number}: not a metrics record ({e}); only a last line can be "
                              f"cut short by a crash, so the file was edited: fix or delete that line") from None
        records.append(record)
    return records
