"""Helpers for the models' feature maps: the memory format of new maps, global pooling, the softmax
over classes in either layout, and whether a graph is being recorded (where the models keep their
plain, size-independent operators)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """The memory format to allocate a map like ``x`` in: channels_last when ``x`` is (NHWC), else
    NCHW. Maps made from strided views (a channel slice times a broadcast) otherwise get strides
    that later ops read as NCHW at batch 1, and the next channels_last convolution copies them."""
    return torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
        else torch.contiguous_format


def spatial_mean(x: torch.Tensor) -> torch.Tensor:
    """``x.mean(dim=(2, 3), keepdim=True)`` as a sum then a division: bit for bit the same in float32.
    For bf16 / fp16 on CPU, ``mean`` (and ``adaptive_avg_pool2d`` to 1x1, which calls it) first
    copies the whole map to float32, where ``sum`` reads it once, accumulating in float32; its
    result is rounded to ``x``'s dtype before the division (one rounding more, on C numbers)."""
    return x.sum(dim=(2, 3), keepdim=True).div_(x.shape[2] * x.shape[3])


def classes_innermost(x: torch.Tensor, dim: int) -> bool:
    """Whether the class dimension ``dim`` of map ``x`` is innermost in memory (a channels_last map,
    or a view of one) rather than NCHW."""
    return x.shape[dim] > 1 and x.stride(dim) == 1 and not x.is_contiguous()


def class_softmax(x: torch.Tensor, dim: int = 1, *, log: bool = False) -> torch.Tensor:
    """``x.softmax(dim)`` (``log_softmax`` with ``log``) over the class dimension ``dim`` of a map
    in either layout. When the classes are innermost in memory (a channels_last map), the softmax
    runs over them as the last dimension of the permuted view and the result keeps that layout: on
    CPU, softmax over a dimension that is not the last first copies a channels_last map to NCHW
    (several times slower than either layout's own kernel, bench/NOTES.md). The values are the
    same up to float rounding (the sum runs in another order)."""
    softmax = F.log_softmax if log else F.softmax
    if x.dim() > 1 and classes_innermost(x, dim):
        return softmax(x.movedim(dim, -1), -1).movedim(-1, dim)
    return softmax(x, dim)


def recording_graph() -> bool:
    """Whether the forward is being recorded as a graph for export (TorchScript tracing,
    ``torch.export``, ONNX). The CPU-only forms of the models depend on the input size or dtype;
    there the plain operators are recorded, valid for any size."""
    return torch.jit.is_tracing() or torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export()
