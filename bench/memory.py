"""Activation memory of a training forward, measured without a GPU: the bytes autograd keeps for
backward.

Every tensor saved for backward passes ``torch.autograd.graph.saved_tensors_hooks``; its storage is
counted once, however many views of it are saved (keyed by the storage's data pointer). The
inputs of a checkpointed region are saved the same way (``torch.utils.checkpoint`` saves them
through autograd), so checkpointing is measured by the same rule. Parameters saved by the layers
that use them (float32 convolution weights) are counted as well, and reported apart.

With ``fake=True`` the model runs on fake tensors (``FakeTensorMode``): shapes, dtypes, autocast
and which tensors autograd saves are those of the real run, but nothing is computed, so the
recipe's model at full size takes seconds in any precision. Fake storages have no data pointer;
their storage object's address keys them instead (tests/test_memory.py checks that both runs
agree).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode



@dataclass(frozen=True)
class SavedBytes:
    """Bytes kept for backward by one training forward: all of them, and of those the parameters'."""

    total: int
    parameters: int


def _storage_key(t: torch.Tensor) -> int:
    storage = t.untyped_storage()
    return storage._cdata if isinstance(t, FakeTensor) else storage.data_ptr()


def saved_bytes(forward: Callable[[], object], parameters: list[torch.Tensor]) -> SavedBytes:
    """Run ``forward`` and count the storages autograd saves for backward, each once."""
    sizes: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        sizes.setdefault(_storage_key(t), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    params = {_storage_key(p) for p in parameters}
    return SavedBytes(sum(sizes.values()), sum(n for key, n in sizes.items() if key in params))


Criterion = Callable[[Any, torch.Tensor], object]


def training_forward_bytes(build: Callable[[], nn.Module], criterion: Criterion, batch: int, size: int,
                           classes: int, *, amp: torch.dtype | None = None, fake: bool = True) -> SavedBytes:
    """:func:`saved_bytes` of one training forward, ``criterion(build()(images), masks)``, on a
    ``batch`` of random ``size`` x ``size`` images in training mode, under CPU autocast to ``amp``
    if given. ``build`` makes the model (inside the fake mode when ``fake``)."""
    with FakeTensorMode() if fake else contextlib.nullcontext():
        model = build().train()
        images = torch.randn(batch, 3, size, size)
        masks = torch.randint(0, classes, (batch, size, size))

        def forward() -> None:
            with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
                criterion(model(images), masks)

        return saved_bytes(forward, list(model.parameters()))
