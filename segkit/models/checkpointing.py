"""Activation checkpointing: keep a region's input for backward and recompute the rest there.

``torch.utils.checkpoint`` runs the region's forward again during backward. Two things must not
change between the first run and the recomputation, or the gradients and the model state would
differ from a run without checkpointing:

- random draws (dropout): the RNG state is saved at the first run and restored for the second
  (``preserve_rng_state``);
- module state: BatchNorm in training mode updates its running statistics on every forward, so
  the recomputation would apply the batch's update a second time. The region's buffers are copied
  before the recomputation and put back after it, so each step updates them exactly once. (The
  recomputed outputs themselves are unaffected: training-mode BatchNorm normalises with the
  batch's own statistics.)
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from types import TracebackType

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class _KeepBuffers:
    """Restores ``modules``' buffers on exit to what they held on entry."""

    def __init__(self, modules: Iterable[nn.Module]) -> None:
        self.buffers = [b for m in modules for b in m.buffers()]
        self.saved: list[torch.Tensor] = []

    def __enter__(self) -> None:
        self.saved = [b.detach().clone() for b in self.buffers]

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        # Also on the exception by which torch stops a recomputation early.
        with torch.no_grad():
            for buffer, saved in zip(self.buffers, self.saved):
                buffer.copy_(saved)
        self.saved = []


def checkpointed(function: Callable[..., torch.Tensor], *args: torch.Tensor,
                 state: Iterable[nn.Module] = ()) -> torch.Tensor:
    """``function(*args)`` with its activations recomputed in backward instead of kept.

    ``state``: the modules whose buffers ``function`` updates (defaults to ``function`` itself
    when it is a module); they are left as the first run left them.
    """
    if torch.compiler.is_compiling():
        # Compiled, the recomputation is planned on the functional graph, where the buffer updates
        # happen once anyway (and dynamo accepts no other context_fn than selective checkpointing's).
        return checkpoint(function, *args, use_reentrant=False, preserve_rng_state=True)
    modules = list(state) or ([function] if isinstance(function, nn.Module) else [])

    def contexts() -> tuple[contextlib.AbstractContextManager, _KeepBuffers]:
        return contextlib.nullcontext(), _KeepBuffers(modules)

    return checkpoint(function, *args, use_reentrant=False, preserve_rng_state=True, context_fn=contexts)
