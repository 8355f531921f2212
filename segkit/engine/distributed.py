"""Thin wrappers over torch.distributed that degrade to no-ops in a single process.

Evaluation and training call these unconditionally, so the same code runs under torchrun,
under a spawned gloo group in the tests, and in a plain ``python`` process.
"""

import torch
import torch.distributed as dist


def is_dist() -> bool:
    """True when a process group is initialised (collectives must then be called on every rank)."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    """Rank 0 alone logs, shows progress bars and writes run-level files."""
    return get_rank() == 0


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
