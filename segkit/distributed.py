"""Thin wrappers over torch.distributed that degrade to no-ops in a single process.

Evaluation and training call these unconditionally, so the same code runs under torchrun,
under a spawned gloo group in the tests, and in a plain ``python`` process.
"""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from segkit.errors import ConfigError


def is_dist() -> bool:
    """True when a process group is initialised (collectives must then be called on every rank)."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    """Rank 0 alone logs, shows progress bars and writes run-level files. Before the process group
    is initialised (or without one) the launcher's ``RANK`` variable decides."""
    return get_rank() == 0 if is_dist() else int(os.environ.get("RANK", "0")) == 0


def barrier() -> None:
    if is_dist():
        dist.barrier()


def all_reduce(tensor: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Sum (or average) ``tensor`` over all ranks in place and return it.

    The average is a sum followed by a division because gloo has no ReduceOp.AVG. With NCCL the
    tensor must live on this rank's CUDA device.
    """
    if is_dist():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        if average:
            tensor /= dist.get_world_size()
    return tensor


def gather_to_main(items: list) -> list:
    """Every rank's ``items`` (picklable), concatenated in rank order on rank 0; an empty list on
    the other ranks (collective: call it on every rank). Without a process group: ``items``."""
    if not is_dist():
        return items
    gathered: list | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(items, gathered, dst=0)
    return [item for part in gathered for item in part] if gathered is not None else []


@dataclass
class Env:
    rank: int
    world_size: int
    device: torch.device


def setup_distributed(device: str, key: str = "train.device") -> Env:
    """Join the process group torchrun (or SLURM via submitit) describes; NCCL on CUDA, gloo on CPU."""
    if "SLURM_PROCID" in os.environ and "RANK" not in os.environ:
        try:  # hydra's submitit launcher: one task per GPU, rendezvous from the SLURM variables
            from submitit.helpers import TorchDistributedEnvironment
            TorchDistributedEnvironment().export()
        except ImportError:
            pass
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"{key}={device!r}; valid choices: auto, cpu, cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key}=cuda but no CUDA device is available; use {key}=auto or cpu")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Env(get_rank(), get_world_size(), torch.device("cuda", local_rank) if use_cuda else torch.device("cpu"))
