"""The models' own feature maps: new maps keep the model's memory format (no NHWC -> NCHW -> NHWC
round trips in a channels_last forward), global pooling reads a map once, the full-size resize of
bf16 logits on CPU runs in float32 and channels_last, and the softmax over classes takes either layout."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from segkit.inference.options import InferenceOptions
from segkit.inference.prepare import prepare_model
from segkit.models.maps import class_softmax, memory_format_of, spatial_mean
from segkit.models.resnest import SplitAttention, create_backbone
from segkit.models.segmentor import Segmentor, resize_logits


def test_memory_format_of_reads_the_layout_at_batch_one():
    x = torch.randn(1, 4, 5, 6)
    assert memory_format_of(x) == torch.contiguous_format
    assert memory_format_of(x.contiguous(memory_format=torch.channels_last)) == torch.channels_last
    assert memory_format_of(torch.randn(2, 3)) == torch.contiguous_format


@pytest.mark.parametrize("shape", [(1, 8, 5, 7), (3, 16, 9, 4)])
def test_spatial_mean_is_the_mean(shape):
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    assert torch.equal(spatial_mean(x), x.mean(dim=(2, 3), keepdim=True))  # float32: bit for bit
    xb = x.bfloat16()
    torch.testing.assert_close(spatial_mean(xb).float(), xb.float().mean(dim=(2, 3), keepdim=True),
                               rtol=8e-3, atol=1e-3)  # one bf16 rounding more
    grad = torch.randn(shape[0], shape[1], 1, 1)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    spatial_mean(a).backward(grad)
    b.mean(dim=(2, 3), keepdim=True).backward(grad)
    assert torch.equal(a.grad, b.grad)


def test_split_attention_output_keeps_channels_last_at_batch_one():
    attention = SplitAttention(8, 8, radix=2).eval()
    x = torch.randn(1, 8, 6, 5).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = attention(x)
        # The avd pool after it keeps the layout only if the strides say channels_last (not just
        # is_contiguous, which ignores the batch dimension's stride at batch 1).
        pooled = nn.AvgPool2d(3, 1, padding=1)(out)
    torch.testing.assert_close(out, attention(x).detach())  # the autograd path's sum over the splits
    assert pooled.is_contiguous(memory_format=torch.channels_last)
    assert out.stride() == torch.empty_like(x[:, :8], memory_format=torch.channels_last).stride()


@pytest.mark.parametrize("dtype", [None, "bf16"])
def test_a_channels_last_forward_feeds_every_conv_a_channels_last_map(dtype):
    # Any NCHW map in between would be copied back by the next convolution (oneDNN, channels_last).
    torch.manual_seed(0)
    model = Segmentor(create_backbone("resnest14", output_stride=8), 5, channels=16).eval()
    model = prepare_model(model, "cpu", InferenceOptions(dtype=dtype))
    seen = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_pre_hook(lambda m, args, name=name: seen.append((name, args[0])))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 72))
    inputs = {name: x for name, x in seen if x.shape[-1] > 1 and x.shape[-2] > 1}
    nchw = [name for name, x in inputs.items() if not name.endswith("backbone.conv1.0")  # the image
            and not torch.empty_like(x, memory_format=torch.channels_last).stride() == x.stride()]
    assert len(inputs) > 20 and nchw == []


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("sizes", [((32, 32), (256, 256)), ((8, 11), (64, 85)), ((9, 6), (4, 5))])
@pytest.mark.parametrize("autocast", [False, True])
def test_half_logits_are_resized_in_float32_channels_last_on_cpu(dtype, align_corners, sizes, autocast):
    (h, w), size = sizes
    logits = torch.randn(2, 6, h, w).to(dtype)
    small = logits.detach().requires_grad_()
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        out = resize_logits(small, size, align_corners)
    assert out.dtype == torch.float32 and out.is_contiguous(memory_format=torch.channels_last)
    ref = logits.double().requires_grad_()
    expected = F.interpolate(ref, size=size, mode="bilinear", align_corners=align_corners)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5)
    grad = torch.randn(expected.shape, dtype=torch.float64)
    got = torch.autograd.grad(out, small, grad.float())[0]
    assert got.dtype == dtype
    want = torch.autograd.grad(expected, ref, grad)[0]
    torch.testing.assert_close(got.double(), want, rtol=1e-2, atol=1e-2 * want.abs().max().item())


def test_float32_logits_keep_the_nchw_resize():
    same = torch.randn(1, 6, 8, 11).contiguous(memory_format=torch.channels_last)
    assert resize_logits(same, (8, 11), True) is same
    out = resize_logits(same, (64, 85), False)
    assert out.is_contiguous()  # NCHW, bit for bit F.interpolate's NCHW kernel
    assert torch.equal(out, F.interpolate(same.contiguous(), size=(64, 85), mode="bilinear", align_corners=False))


@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("dim, shape", [(1, (2, 7, 5, 6)), (-3, (7, 5, 6)), (0, (7, 4, 3))])
def test_class_softmax_takes_either_layout(log, dim, shape):
    x = torch.randn(shape, dtype=torch.float64) * 5
    expected = F.log_softmax(x, dim) if log else F.softmax(x, dim)
    nchw = class_softmax(x, dim, log=log)
    assert torch.equal(nchw, expected)  # NCHW: the plain softmax itself
    # Classes innermost: the permuted view's softmax, in that layout, equal up to rounding.
    inner = x.movedim(dim, -1).contiguous().movedim(-1, dim)
    out = class_softmax(inner, dim, log=log)
    assert out.stride(dim) == 1
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    # A cropped view of such a map as well (the multi-scale windows are cropped to the image).
    crop = (slice(None),) * (x.dim() - 2) + (slice(0, 3), slice(1, 4))
    torch.testing.assert_close(class_softmax(inner[crop], dim, log=log),
                               F.log_softmax(x[crop], dim) if log else F.softmax(x[crop], dim), rtol=1e-12, atol=1e-12)


def test_a_traced_bf16_model_records_the_interpolation():
    def fn(x: torch.Tensor) -> torch.Tensor:
        return resize_logits(x, (x.shape[-2] * 8, x.shape[-1] * 8), True)

    x = torch.randn(1, 3, 4, 5).bfloat16()
    traced = torch.jit.trace(fn, x, check_trace=False)  # eager resizes in channels_last: rounding differs
    assert "upsample_bilinear2d" in str(traced.graph)
    assert traced(x).dtype == torch.float32 and traced(x).is_contiguous()  # NCHW, as ONNX expects
    torch.testing.assert_close(traced(x), fn(x), rtol=1e-5, atol=1e-5)


def test_bf16_eval_logits_agree_with_fp32():
    torch.manual_seed(0)
    model = Segmentor(create_backbone("resnest14", output_stride=8), 5, channels=16).eval()
    x = torch.randn(1, 3, 64, 72)
    with torch.no_grad():
        fp32 = prepare_model(copy.deepcopy(model), "cpu")(x)["out"]
        bf16 = prepare_model(copy.deepcopy(model), "cpu", InferenceOptions(dtype="bf16"))(x)["out"]
    assert bf16.dtype == torch.float32 and bf16.shape == fp32.shape
    torch.testing.assert_close(bf16, fp32, rtol=0.05, atol=0.05 * fp32.abs().max().item())
