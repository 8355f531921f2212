"""Activation recomputation: keep less for backward and recompute the rest there.

Two modes, chosen per region (the stem, each block, each head) by :func:`recomputed`:

- ``full`` (``train.grad_checkpointing``): only the region's input is kept; its whole forward,
  convolutions included, runs again in backward.
- ``selective`` (``train.selective_recompute``): the convolutions' outputs are kept as well, and only
  the cheap operations between them (BatchNorm, ReLU, pooling, the split-attention weights and
  mixing, residual additions, dropout) run again in backward, the convolutions' results coming from
  that cache (PyTorch's selective activation checkpointing). A conv -> BatchNorm -> ReLU -> conv
  chain then keeps one tensor where it kept two (BatchNorm's input and the ReLU output the next
  convolution needs), and no bf16 copy of a weight under autocast.

``torch.utils.checkpoint`` runs the region's forward again during backward. Two things must not
change between the first run and the recomputation, or the gradients and the model state would
differ from a run without it:

- random draws (dropout): the RNG state is saved at the first run and restored for the second
  (``preserve_rng_state``);
- module state: BatchNorm in training mode updates its running statistics on every forward, so
  the recomputation would apply the batch's update a second time. The region's buffers are copied
  before the recomputation and put back after it, so each step updates them exactly once. (The
  recomputed outputs themselves are unaffected: training-mode BatchNorm normalises with the
  batch's own statistics.)

The tensors the selective mode caches pass through the saved-tensor hooks in force around the
region (``respect_saved_tensors_hooks``), as autograd's own saved tensors do: ``save_on_cpu``
applies to them, and bench/memory.py counts them.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from types import TracebackType

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

RECOMPUTE_MODES = ("none", "selective", "full")


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


def _keep_convolutions(ctx: object, op: object, *args: object, **kwargs: object) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op is torch.ops.aten.convolution.default else CheckpointPolicy.PREFER_RECOMPUTE


def recomputed(function: Callable[..., torch.Tensor], *args: torch.Tensor, mode: str,
               state: Iterable[nn.Module] = ()) -> torch.Tensor:
    """``function(*args)``, with its activations recomputed in backward as ``mode`` says
    (one of :data:`RECOMPUTE_MODES`; ``none``, and any mode while no gradient is recorded, is a
    plain call).

    ``state``: the modules whose buffers ``function`` updates (defaults to ``function`` itself
    when it is a module); they are left as the first run left them.
    """
    if mode not in RECOMPUTE_MODES:
        raise ValueError(f"unknown recompute mode {mode!r}; valid choices: {', '.join(RECOMPUTE_MODES)}")
    if mode == "none" or not torch.is_grad_enabled():
        return function(*args)
    if torch.compiler.is_compiling():
        if mode == "selective":
            # The compiled graph's partitioner already recomputes cheap element-wise work.
            return function(*args)
        # Compiled, the recomputation is planned on the functional graph, where the buffer updates
        # happen once anyway (and dynamo accepts no other context_fn than selective checkpointing's).
        return checkpoint(function, *args, use_reentrant=False, preserve_rng_state=True)
    modules = list(state) or ([function] if isinstance(function, nn.Module) else [])

    def contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        if mode == "full":
            return contextlib.nullcontext(), _KeepBuffers(modules)
        caching, cached = create_selective_checkpoint_contexts(_keep_convolutions)
        return caching, _Nested(_KeepBuffers(modules), cached)

    return checkpoint(function, *args, use_reentrant=False, preserve_rng_state=True, context_fn=contexts,
                      respect_saved_tensors_hooks=True)


class _Nested:
    """Enters its context managers in order and leaves them in reverse: the buffers are copied
    before the cache's dispatch mode is active (it would take the copies for recomputed ops) and
    restored after it has ended."""

    def __init__(self, *managers: contextlib.AbstractContextManager) -> None:
        self.managers = managers
        self.stack = contextlib.ExitStack()

    def __enter__(self) -> None:
        for manager in self.managers:
            self.stack.enter_context(manager)

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> bool | None:
        return self.stack.__exit__(kind, error, traceback)
