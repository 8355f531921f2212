"""The models' own feature maps: new maps keep the model's memory format (no NHWC -> NCHW -> NHWC
round trips in a channels_last forward), global pooling reads a map once, and the full-size
resize of bf16 logits on CPU runs as two matrix products in float32, equal to F.interpolate."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from segkit.inference.options import InferenceOptions
from segkit.inference.prepare import prepare_model
from segkit.models.maps import memory_format_of, spatial_mean
from segkit.models.resnest import SplitAttention, create_backbone
from segkit.models.segmentor import Segmentor, resize_by_matmul, resize_logits


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


@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("sizes", [((32, 32), (256, 256)), ((8, 11), (64, 85)), ((7, 5), (13, 29)), ((9, 6), (4, 5))])
def test_resize_by_matmul_is_bilinear_interpolation(sizes, align_corners):
    (h, w), size = sizes
    x = torch.randn(2, 3, h, w, dtype=torch.float64, requires_grad=True)
    ours = resize_by_matmul(x, size, align_corners)
    theirs = F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)
    grad = torch.randn_like(ours)
    torch.testing.assert_close(torch.autograd.grad(ours, x, grad)[0], torch.autograd.grad(theirs, x, grad)[0],
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("autocast", [False, True])
def test_bf16_logits_are_resized_in_float32_on_cpu(autocast):
    logits = torch.randn(1, 6, 8, 11).bfloat16().contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        out = resize_logits(logits, (64, 85), True)
    assert out.dtype == torch.float32 and out.is_contiguous()
    expected = F.interpolate(logits.float(), size=(64, 85), mode="bilinear", align_corners=True)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    same = torch.randn(1, 6, 8, 11)
    assert resize_logits(same, (8, 11), True) is same
    assert torch.equal(resize_logits(same, (64, 85), False),
                       F.interpolate(same, size=(64, 85), mode="bilinear", align_corners=False))


def test_a_traced_bf16_model_records_the_interpolation():
    def fn(x: torch.Tensor) -> torch.Tensor:
        return resize_logits(x, (x.shape[-2] * 8, x.shape[-1] * 8), True)

    x = torch.randn(1, 3, 4, 5).bfloat16()
    traced = torch.jit.trace(fn, x, check_trace=False)  # eager takes the matrix products: rounding differs
    assert "upsample_bilinear2d" in str(traced.graph) and "matmul" not in str(traced.graph)
    assert traced(x).dtype == torch.float32
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
