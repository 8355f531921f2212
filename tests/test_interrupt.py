"""A run that survives interruption and failure on any rank (issue 15): Ctrl-C and SIGTERM, an error
on one rank, a killed launcher, a damaged metrics.jsonl, a killed DataLoader worker.

The end-to-end tests run train_seg.py as a user would, in one process and under torchrun with two
gloo ranks; the others check the pieces in this process.
"""
import json

import pytest

from segkit.engine.run_dir import read_metrics
from segkit.errors import ConfigError
from segkit.files import append_line


# -- records ------------------------------------------------------------------------------------
def test_metrics_reader_drops_only_a_cut_last_line(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    append_line(path, json.dumps({"iter": 1, "loss": 1.0}))
    append_line(path, json.dumps({"iter": 2, "loss": 0.5}))
    assert [r["iter"] for r in read_metrics(path)] == [1, 2] and capsys.readouterr().err == ""
    path.write_text(path.read_text() + '{"iter": 3, "lo')
    assert [r["iter"] for r in read_metrics(path)] == [1, 2]
    assert "dropped its last line" in capsys.readouterr().err
    path.write_text('{"iter": 1}\n{"iter": 2, "lo\n{"iter": 3}\n')
    with pytest.raises(ConfigError, match="line 2: not a metrics record"):
        read_metrics(path)
