"""The ASPP's dilated 3x3 convolutions as a sum of GEMMs over the taps that touch the image.

A 3x3 convolution with dilation ``d`` and padding ``d`` adds, for each tap ``(ky, kx)``, a 1x1
convolution of the input shifted by ``((ky - 1) d, (kx - 1) d)``. In NHWC a 1x1 convolution is one
GEMM over the pixels, and a vertical shift is a contiguous band of rows, so each tap is a GEMM on a
view of the input: no im2col copy, and the taps whose shift reaches past the feature map (wholly in
the zero padding, common at the ASPP's rates 12/24/36 on 60-pixel maps) are skipped. oneDNN's bf16
kernels for these convolutions run several times slower than its fp32 ones on CPUs with bf16 units,
while its bf16 GEMMs run at the units' speed; in fp32, and on GPUs, the convolution stays faster
(bench/NOTES.md), so :func:`use_tap_gemm` picks the GEMM form for bf16 on such CPUs only.

:class:`DilatedConv2d` is an ``nn.Conv2d`` (same parameters and state-dict keys, BatchNorm folding
and checkpoint conversion unchanged) whose forward takes the GEMM form where :func:`use_tap_gemm`
says so. Graph exports (tracing, ``torch.export``, ONNX) always record the plain convolution, whose
graph holds for any input size; the GEMM form depends on the size through the skipped taps.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from segkit.models.maps import recording_graph


@functools.cache
def cpu_has_bf16_units() -> bool:
    """Whether this CPU computes bf16 products natively (AVX512-BF16 or AMX); without them oneDNN
    emulates bf16 with fp32 arithmetic plus conversions."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def use_tap_gemm(dtype: torch.dtype, device_type: str, dilation: int, bf16_units: bool) -> bool:
    """Whether :class:`DilatedConv2d` computes a dilated 3x3 convolution as per-tap GEMMs.

    Only for bf16 on a CPU with bf16 units: there oneDNN's dilated bf16 convolution is slow and its
    GEMMs are fast. fp32 (on any CPU), emulated bf16 and GPUs keep the convolution, so their numbers
    do not change. Measured faster for every ASPP rate (6 .. 36) at every map size tried, from 8x8
    (where only the centre tap touches the map) to 64x85 (bench/NOTES.md).
    """
    return device_type == "cpu" and dtype == torch.bfloat16 and bf16_units and dilation > 1


def _span(shift: int, length: int) -> tuple[int, int]:
    """Output positions ``[start, stop)`` whose input position ``+ shift`` lies inside ``length``."""
    return max(0, -shift), min(length, length - shift)


def dilated_conv3x3_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         dilation: int) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=dilation, dilation=dilation)`` for a 3x3 ``weight``
    (groups 1, stride 1) as a sum of GEMMs, one per tap that touches the map; differentiable.

    ``x``: N x C x H x W, any memory format (channels_last avoids a copy); the result is
    N x Cout x H x W in channels_last. Taps are accumulated in ``x``'s dtype.
    """
    n, c, h, w = x.shape
    cout = weight.shape[0]
    xh = x.permute(0, 2, 3, 1).contiguous()  # NHWC; a view already for channels_last input
    # One (C, Cout) matrix per tap: views of a channels_last weight (a GEMM reads them transposed);
    # unbind's backward stacks the taps' gradients once instead of scattering each into a full one.
    taps = weight.permute(2, 3, 1, 0).reshape(9, c, cout).unbind(0)

    out = xh.reshape(n * h * w, c) @ taps[4]  # centre tap: every pixel, fills the output
    if bias is not None:
        out += bias
    out = out.view(n, h, w, cout)
    for ky in (0, 1, 2):
        dy = (ky - 1) * dilation
        y0, y1 = _span(dy, h)
        if y0 >= y1:
            continue  # this row of taps lies wholly in the padding
        # The input rows these taps read, as one GEMM operand per image (a view, rows contiguous).
        band = xh[:, y0 + dy:y1 + dy].reshape(n, (y1 - y0) * w, c)
        rows = out[:, y0:y1]
        for kx in (0, 1, 2):
            dx = (kx - 1) * dilation
            x0, x1 = _span(dx, w)
            if (ky, kx) == (1, 1) or x0 >= x1:
                continue
            matrix = taps[3 * ky + kx]
            # Image by image: a GEMM reads the strided tap as it is, where a batched GEMM needs it
            # copied and broadcast (slower, bench/NOTES.md).
            for i in range(n):
                if dx == 0:  # whole rows: accumulate inside the GEMM
                    rows[i].view((y1 - y0) * w, cout).addmm_(band[i], matrix)
                else:  # the GEMM over whole rows, then the shifted columns of its result
                    partial = (band[i] @ matrix).view(y1 - y0, w, cout)
                    rows[i, :, x0:x1] += partial[:, x0 + dx:x1 + dx]
    return out.permute(0, 3, 1, 2)


class DilatedConv2d(nn.Conv2d):
    """A 3x3 ``nn.Conv2d`` with padding = dilation, whose forward runs :func:`dilated_conv3x3_gemm`
    where :func:`use_tap_gemm` chooses it (under autocast, for the autocast dtype).

    ``tap_gemm``: ``None`` decides per call; ``True`` / ``False`` force either form (tests,
    benchmarks). Graph exports and TorchScript tracing record the convolution in every case.
    """

    def __init__(self, in_channels: int, out_channels: int, dilation: int, bias: bool = False) -> None:
        super().__init__(in_channels, out_channels, 3, padding=dilation, dilation=dilation, bias=bias)
        self.tap_gemm: bool | None = None

    def _gemm_dtype(self, x: torch.Tensor) -> torch.dtype | None:
        """The dtype to run the GEMM form in, or None for the convolution."""
        if recording_graph():
            return None
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        chosen = self.tap_gemm
        if chosen is None:
            chosen = use_tap_gemm(dtype, device, self.dilation[0], cpu_has_bf16_units())
        return dtype if chosen else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self._gemm_dtype(x)
        if dtype is None:
            return super().forward(x)
        bias = None if self.bias is None else self.bias.to(dtype)
        return dilated_conv3x3_gemm(x.to(dtype), self.weight.to(dtype), bias, self.dilation[0])
