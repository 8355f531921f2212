import os

# albumentations phones home for a newer version on import; tests run offline.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import sys
from pathlib import Path

# The benchmark's naive multi-scale loop (bench/naive.py) is the tests' reference too.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def shared_data_root(tmp_path_factory):
    """$SEGKIT_DATA of the tests that share one trained model (the demo scenes at TINY size)."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, shared_data_root):
    """One tiny training run (2 iterations, validated at the end: last.pt and best.pt) that the
    evaluation, prediction, release and deployment tests read, never write."""
    from train_helpers import TINY, run

    run_dir = tmp_path_factory.mktemp("run")
    run(TINY + ["train.iters=2", "train.val_every=2", f"hydra.run.dir={run_dir}"], shared_data_root)
    return run_dir


@pytest.fixture(scope="session")
def trained_last(trained_run):
    """The shared run's last.pt."""
    return trained_run / "last.pt"


@pytest.fixture(scope="session")
def trained_best(trained_run):
    """The shared run's best.pt."""
    return trained_run / "best.pt"
