import os

# albumentations phones home for a newer version on import; tests run offline.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import sys
from pathlib import Path

# The benchmark's naive multi-scale loop (bench/naive.py) is the tests' reference too.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


import pytest  # noqa: E402


def pytest_configure(config):
    # Under pytest-xdist (setup.cfg runs two workers) each worker computes on one thread: two
    # workers of two threads each would only contend for the two cores.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


@pytest.fixture(scope="session")
def shared_data_root(tmp_path_factory):
    """$SEGKIT_DATA of the tests that share one trained model (the demo scenes at TINY size)."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, shared_data_root):
    """One tiny training run (2 iterations, validated at the end: last.pt and best.pt) that the
    evaluation, prediction, release and deployment tests read, never write. It runs in this
    process, on the settings train_seg.py would compose."""
    import torch

    from config_helpers import train_settings
    from segkit.training.trainer import train
    from train_helpers import TINY

    run_dir = tmp_path_factory.mktemp("run")
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SEGKIT_DATA", str(shared_data_root))
        torch.set_num_threads(1)
        try:
            train(train_settings(*(a.lstrip("+") for a in TINY), "train.iters=2", "train.val_every=2"), run_dir)
        finally:
            torch.set_num_threads(threads)
    return run_dir


@pytest.fixture(scope="session")
def trained_last(trained_run):
    """The shared run's last.pt."""
    return trained_run / "last.pt"


@pytest.fixture(scope="session")
def trained_best(trained_run):
    """The shared run's best.pt."""
    return trained_run / "best.pt"


@pytest.fixture
def cli(capfd, monkeypatch):
    """The command line, run in this process: ``cli("train", args, data_root)`` calls
    ``segkit.cli.train_main`` (``"eval"``, ``"export"``: their mains) with ``args`` as its command
    line, in the checkout, and returns what a subprocess would (``returncode``, ``stdout``,
    ``stderr``, captured at the file descriptors). For tests whose subject is what a command does
    (its files, its one-line errors, its exit status): no interpreter, torch and Hydra start-up per
    call. Signals, torchrun and killed processes need real subprocesses (train_helpers.run)."""
    import subprocess

    import torch
    from hydra.core.global_hydra import GlobalHydra

    from segkit import cli as commands
    from train_helpers import ROOT

    mains = {"train": commands.train_main, "eval": commands.eval_main, "export": commands.export_main}
    scripts = {"train": "train_seg.py", "eval": "eval_seg.py", "export": "export_model.py"}

    def run(command: str, args: list[str], data_root: Path) -> subprocess.CompletedProcess:
        monkeypatch.chdir(ROOT)
        monkeypatch.setenv("SEGKIT_DATA", str(data_root))
        monkeypatch.setenv("HYDRA_FULL_ERROR", "1")  # set by the command; restored afterwards
        monkeypatch.setattr(sys, "argv", [scripts[command], *args])
        capfd.readouterr()
        GlobalHydra.instance().clear()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as train_helpers.env gives a subprocess
        code = 0
        try:
            mains[command]()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        finally:
            GlobalHydra.instance().clear()
            torch.set_num_threads(threads)
        out, err = capfd.readouterr()
        return subprocess.CompletedProcess([scripts[command], *args], code, out, err)

    return run


def _checked(proc, check: bool):
    if check and proc.returncode != 0:
        raise AssertionError(f"{proc.args[0]} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture
def cli_train(cli):
    """``cli_train(args, data_root, check=True)``: train_seg.py in this process (``train_helpers.run``
    runs it in a subprocess); a failure raises unless ``check=False``."""
    return lambda args, data_root, check=True: _checked(cli("train", args, data_root), check)


@pytest.fixture
def cli_eval(cli):
    """``cli_eval(args, data_root, check=True)``: eval_seg.py in this process, quietly and without
    workers (``train_helpers.run_eval`` runs it in a subprocess)."""
    return lambda args, data_root, check=True: _checked(
        cli("eval", ["eval.progress=false", "eval.workers=0", *args], data_root), check)
