"""The command-line entry points (``segkit-train``, ``segkit-eval``, ``segkit-export``; ``train_seg.py``,
``eval_seg.py`` and ``export_model.py`` in a checkout) and what they share: one line and exit status 2
for every expected error, one run directory for all ranks.

The configs ship in the package (``segkit.conf``, which is the checkout's ``conf/``); a user's own
config directory joins them with ``--config-dir DIR`` or ``hydra.searchpath=[file://DIR]``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from segkit import distributed, reporting
from segkit.errors import SegkitError
from segkit.launch import maybe_launch
from segkit.training.interrupt import Interrupted, exit_status, watch_parent

T = TypeVar("T")
CONFIG_PATH = "pkg://segkit.conf"
# OSErrors about a path the user gave (or that derives from one): reported in one line.
_PATH_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT,
                errno.EEXIST, errno.EISDIR, errno.ENOTDIR, errno.ENAMETOOLONG, errno.ELOOP}


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


def _run_dir(parent: str, resume: object = None) -> str:
    """``parent/<time stamp>``; with ``resume=latest`` the newest run under ``parent`` that has a
    ``last.pt`` (a new stamp when there is none)."""
    if resume == "latest":
        runs = sorted((p for p in Path(parent).glob("*/last.pt")), key=lambda p: p.parent.name)
        if runs:
            return str(runs[-1].parent)
    return f"{parent}/{_run_stamp()}"


def register_resolvers() -> None:
    """``${segkit_run_stamp:}`` and ``${segkit_run_dir:PARENT,RESUME}`` in the configs, and the
    schemas the configs are presets of."""
    from segkit.config import register_schemas

    if not OmegaConf.has_resolver("segkit_run_stamp"):
        OmegaConf.register_new_resolver("segkit_run_stamp", _run_stamp, use_cache=True)
    if not OmegaConf.has_resolver("segkit_run_dir"):
        OmegaConf.register_new_resolver("segkit_run_dir", _run_dir, use_cache=True)
    register_schemas()


def _worker_message(e: SegkitError) -> str:
    """The original message of an error a DataLoader worker raised (torch re-raises it in the main
    process with the worker's traceback as its message)."""
    text = str(e)
    if "DataLoader worker process" not in text or "Original Traceback" not in text:
        return text
    marker = f"{type(e).__module__}.{type(e).__qualname__}: "
    return text.rsplit(marker, 1)[-1].strip() if marker in text else text


def _hydra_message(e: Exception) -> str:
    """Hydra's multi-line composition error as one line, naming the key or option."""
    from hydra.errors import MissingConfigException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    cause = e.__cause__ if isinstance(e.__cause__, OmegaConfBaseException) else e
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and dataclasses.is_dataclass(getattr(cause, "object_type", None)):
        valid = ", ".join(f.name for f in dataclasses.fields(cause.object_type))
        return f"{cause.full_key}: no such key; valid keys here: {valid}"
    if isinstance(cause, OmegaConfBaseException):
        from segkit.settings import describe_omegaconf_error

        return describe_omegaconf_error(cause)
    if isinstance(e, MissingConfigException) and e.options:
        return f"could not find config '{e.missing_cfg_file}'; available options: {', '.join(sorted(e.options))}"
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith(("Config search path", "provider=",
                                                            "Set the environment variable"))]
    return "; ".join(lines)


def describe_error(e: BaseException) -> str | None:
    """The one-line message for an expected error, or None for one that keeps its traceback."""
    if isinstance(e, SegkitError):
        return _worker_message(e)
    if isinstance(e, OSError) and e.errno in _PATH_ERRNOS and e.filename is not None:
        target = f"{e.filename} -> {e.filename2}" if e.filename2 else str(e.filename)
        hint = " (a file stands where a directory belongs)" if e.errno in (errno.EEXIST, errno.ENOTDIR) else ""
        return f"{target}: {e.strerror}{hint}"
    from hydra.errors import HydraException

    if isinstance(e, (HydraException, OmegaConfBaseException)):
        return _hydra_message(e)
    return None


def _print_error(line: str) -> None:
    try:
        print(line, file=sys.stderr, flush=True)
    except OSError:  # stderr is gone (the launcher was killed): the exit status still tells
        pass


def _exit(status: int) -> NoReturn:
    """End the process with ``status``. A rank of a process group ends at once, output flushed:
    Python's shutdown with torch loaded takes a second or more, and torchrun's SIGTERM to the other
    ranks, arriving then, would make their status "killed by SIGTERM"."""
    if distributed.get_world_size() > 1:
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(status)
    sys.exit(status)


def fail(message: str) -> NoReturn:
    """End the command with ``error: message`` and exit status 2.

    In a process group, the failing rank prints, naming itself; a rank that fails with the message
    another rank already gave stays quiet. Before the group exists (settings, Hydra), every rank
    fails alike and rank 0 alone prints."""
    if distributed.get_world_size() > 1:
        _exit_2_on_sigterm()
        line = f"error: [rank {distributed.get_rank()}] {message}"
        if reporting.claim(message):
            _print_error(line)
            reporting.write_error_file(line)
    else:
        line = f"error: {message}"
        if distributed.is_main_process():
            _print_error(line)
        reporting.write_error_file(line)
    _exit(2)


def _lost_peer() -> NoReturn:
    """A collective failed because another rank is gone: quiet when that rank has said why."""
    _exit_2_on_sigterm()
    first = reporting.first_failure()
    if first is not None:
        if first[0] >= 0:  # torchrun's summary lists this rank too: say why it stopped
            reporting.write_error_file(f"[rank {distributed.get_rank()}] stopped because rank {first[0]} "
                                       f"failed: {first[1]}")
        _exit(2)
    fail("lost contact with another rank during a collective: it ended without a message (killed by "
         "a signal, e.g. by the out-of-memory killer?); see the launcher's report of its exit")


def _exit_2_on_sigterm() -> None:
    """Once one rank fails, torchrun stops the others with SIGTERM: let them end with status 2 too."""
    def exit_2(signum: int, frame: object) -> None:
        _exit(2)

    try:
        signal.signal(signal.SIGTERM, exit_2)
    except ValueError:  # not the main thread
        pass


def run_cli(fn: Callable[[], T]) -> T:
    """Run ``fn``; an expected error ends the command with its message (one line, see :func:`fail`)
    and exit status 2; a training run stopped by a signal ends with its one line and 128 + the
    signal number; anything else keeps its traceback."""
    try:
        return fn()
    except Interrupted as e:
        if distributed.is_main_process():
            _print_error(str(e))
        sys.exit(e.exit_status)
    except KeyboardInterrupt:  # Ctrl-C outside the training loop: nothing half-done is kept
        if distributed.is_main_process():
            _print_error("interrupted (SIGINT)")
        sys.exit(exit_status(signal.SIGINT))
    except Exception as e:  # noqa: BLE001 - sorted into expected and unexpected right here
        message = describe_error(e)
        if message is not None:
            fail(message)
        if reporting.is_lost_peer(e):
            _lost_peer()
        if distributed.get_world_size() > 1 and reporting.claim(f"{type(e).__name__}: {e}"):
            reporting.write_error_file(f"[rank {distributed.get_rank()}] {type(e).__name__}: {e}", with_traceback=True)
        raise


def hydra_command(config_name: str, task: Callable[[DictConfig, Path, list[str]], None]) -> None:
    """Compose ``config_name`` from the packaged configs (with the command line's overrides) and run
    ``task(cfg, run_dir, overrides)``; composition errors get one line and exit status 2 as well."""
    import hydra
    from hydra.core.hydra_config import HydraConfig

    register_resolvers()
    # Hydra would print its own composition errors with exit status 1; let them reach run_cli.
    os.environ["HYDRA_FULL_ERROR"] = "1"

    @hydra.main(config_path=CONFIG_PATH, config_name=config_name, version_base="1.3")
    def main(cfg: DictConfig) -> None:
        hydra_cfg = HydraConfig.get()
        watch_parent()  # under torchrun: stop when the launcher is gone
        # Inside the job too: Hydra would add a line of its own to an error leaving the job.
        run_cli(lambda: task(cfg, Path(hydra_cfg.runtime.output_dir), list(hydra_cfg.overrides.task)))

    run_cli(main)


def _train(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> None:
    from segkit.config import train_job
    from segkit.training.trainer import train  # after Hydra has parsed: `--help` stays fast

    summary = train(train_job(cfg), run_dir)
    if distributed.is_main_process():
        print(json.dumps(summary))


def _eval(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> None:
    from segkit.checkpoints.load import load_model
    from segkit.config import checkpoint_path, eval_job, inference_options
    from segkit.evaluation.evaluator import run_evaluation

    path = checkpoint_path(cfg)
    inference_options(eval_job(cfg, None, overrides))  # bad values are reported before a large checkpoint is read
    ckpt = load_model(path)
    job = eval_job(cfg, ckpt.config, overrides)
    run_evaluation(job, inference_options(job), ckpt, run_dir)


def _export(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> None:
    from segkit.checkpoints.load import load_model
    from segkit.config import checkpoint_path, export_model_job
    from segkit.inference.export_job import export_model

    ckpt = load_model(checkpoint_path(cfg))
    export_model(export_model_job(cfg, ckpt.config, overrides), ckpt)


def train_main() -> None:
    """``segkit-train``: train a segmentor; the defaults are the paper's recipe. With
    ``--nproc-per-node=N``: on N ranks of this machine (:mod:`segkit.launch`)."""
    maybe_launch(sys.argv)
    hydra_command("train", _train)


def eval_main() -> None:
    """``segkit-eval``: evaluate a checkpoint (multi-scale + flip by default) and export masks; with
    ``--nproc-per-node=N`` on N ranks."""
    maybe_launch(sys.argv)
    hydra_command("eval", _eval)


def export_main() -> None:
    """``segkit-export``: a checkpoint as a release (safetensors + config.json + model card) or as an
    ONNX / TorchScript / ExportedProgram graph checked against PyTorch."""
    hydra_command("export_model", _export)


def report_main(argv: list[str] | None = None) -> None:
    """``segkit-report RUN_A RUN_B``: one page comparing two evaluations of the same dataset (their
    run directories or metrics.json files): per-class IoU of both and the differences, and the
    images that changed most when both have a per_image.jsonl."""
    import argparse

    from segkit.evaluation.report import write_comparison

    parser = argparse.ArgumentParser(prog="segkit-report", description=report_main.__doc__.split(":", 1)[1].strip())
    parser.add_argument("run_a", help="the first evaluation: its run directory or metrics.json")
    parser.add_argument("run_b", help="the second evaluation, of the same dataset")
    parser.add_argument("-o", "--out", default="compare.html", help="the page to write (default: %(default)s)")
    args = parser.parse_args(argv)
    page = run_cli(lambda: write_comparison(args.run_a, args.run_b, args.out))
    print(f"comparison written to {page}")


def zoo_main() -> None:
    """``segkit-zoo``: released models by name (``list``, ``download``, ``import``, ``path``)."""
    from segkit.checkpoints.zoo import command

    sys.exit(run_cli(lambda: command(sys.argv[1:])))
