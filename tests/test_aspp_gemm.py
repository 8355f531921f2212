"""The ASPP's dilated 3x3 convolutions as per-tap GEMMs (segkit.models.dilated), checked against
PyTorch's own convolution and its autograd: forward and backward, fp32 and bf16, under autocast,
torch.compile, BatchNorm folding and the graph exports."""
import numpy as np
import onnxruntime
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import segkit.models.dilated as dilated
from segkit.models.bn_fold import fold_batchnorm
from segkit.models.dilated import DilatedConv2d, dilated_conv3x3_gemm, use_tap_gemm
from segkit.models.heads import ASPP
from segkit.models.resnest import create_backbone
from segkit.models.segmentor import Segmentor

# (batch, channels, height, width, dilation): every tap inside; side taps cut; rows of taps wholly
# in the padding; only the centre tap left (dilation >= both sides); a batch with skipped taps.
SHAPES = [(1, 6, 9, 11, 2), (2, 5, 13, 10, 6), (1, 4, 20, 7, 12), (3, 4, 5, 6, 36), (2, 3, 30, 31, 24)]


def conv_weights(channels: int, out: int = 4, bias: bool = True, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(out, channels, 3, 3, generator=gen), (torch.randn(out, generator=gen) if bias else None)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_fp32_equals_the_convolution_forward_and_backward(shape, channels_last):
    n, c, h, w, d = shape
    x = torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(1))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight, bias = conv_weights(c, bias=n != 1)
    grad = torch.randn(n, 4, h, w, generator=torch.Generator().manual_seed(2))
    results = []
    for fn in (lambda *a: F.conv2d(*a, padding=d, dilation=d), lambda *a: dilated_conv3x3_gemm(*a, d)):
        leaves = [t.clone().requires_grad_() for t in (x, weight) + ((bias,) if bias is not None else ())]
        out = fn(leaves[0], leaves[1], leaves[2] if bias is not None else None)
        out.backward(grad)
        results.append([out.detach()] + [t.grad for t in leaves])
    for expected, got in zip(*results):
        # float32 rounding: the same products summed in another order.
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_float64_is_exact_to_the_last_bits():
    x = torch.randn(2, 5, 17, 14, dtype=torch.float64)
    weight = torch.randn(3, 5, 3, 3, dtype=torch.float64, requires_grad=True)
    small = x[:1, :2, :7, :8].clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: dilated_conv3x3_gemm(a, b, None, 6), (small, weight[:, :2]))
    torch.testing.assert_close(dilated_conv3x3_gemm(x, weight, None, 12),
                               F.conv2d(x, weight, padding=12, dilation=12), rtol=1e-12, atol=1e-12)


def test_bf16_agrees_with_fp32_like_the_bf16_convolution():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 64, 12, 15, generator=gen)
    weight = torch.randn(8, 64, 3, 3, generator=gen) / 24
    reference = F.conv2d(x, weight, padding=4, dilation=4)
    xb, wb = x.bfloat16(), weight.bfloat16()
    conv_error = (F.conv2d(xb, wb, padding=4, dilation=4).float() - reference).abs().max()
    gemm_error = (dilated_conv3x3_gemm(xb, wb, None, 4).float() - reference).abs().max()
    # Each tap's GEMM rounds to bf16 before the taps are summed: a few ulps, not a different result.
    assert gemm_error <= 4 * conv_error + 1e-6
    assert gemm_error <= 0.02 * reference.abs().max()


@pytest.mark.parametrize("dtype,device,dilation,units,expected", [
    (torch.bfloat16, "cpu", 12, True, True),
    (torch.bfloat16, "cpu", 2, True, True),
    (torch.bfloat16, "cpu", 1, True, False),     # not dilated: nothing to skip
    (torch.bfloat16, "cpu", 12, False, False),   # emulated bf16: keep the convolution
    (torch.float32, "cpu", 12, True, False),     # fp32 keeps the convolution on every CPU
    (torch.float32, "cpu", 12, False, False),
    (torch.float16, "cpu", 12, True, False),
    (torch.bfloat16, "cuda", 12, True, False),   # cuDNN's dilated convolutions are not the problem
])
def test_the_choice_is_a_function_of_dtype_device_dilation_and_bf16_units(dtype, device, dilation, units, expected):
    assert use_tap_gemm(dtype, device, dilation, units) is expected


def test_bf16_units_are_read_from_the_cpu():
    flags = set()
    for line in open("/proc/cpuinfo"):
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    if not flags:
        pytest.skip("no /proc/cpuinfo flags")
    assert dilated.cpu_has_bf16_units() == bool(flags & {"avx512_bf16", "amx_bf16"})


def run_and_record_form(module: DilatedConv2d, x: torch.Tensor, monkeypatch) -> tuple[torch.Tensor, list[str]]:
    forms = []
    real = dilated.dilated_conv3x3_gemm

    def recording(*args):
        forms.append("gemm")
        return real(*args)
    monkeypatch.setattr(dilated, "dilated_conv3x3_gemm", recording)
    out = module(x)
    return out, forms or ["conv"]


@pytest.mark.parametrize("units", [False, True])
def test_module_picks_the_form_per_call(monkeypatch, units):
    monkeypatch.setattr(dilated, "cpu_has_bf16_units", lambda: units)
    conv = DilatedConv2d(6, 4, dilation=3)
    x = torch.randn(1, 6, 10, 10)
    with torch.no_grad():
        out, forms = run_and_record_form(conv, x, monkeypatch)
        assert forms == ["conv"]  # fp32: the convolution, bit for bit
        assert torch.equal(out, F.conv2d(x, conv.weight, padding=3, dilation=3))
        _, forms = run_and_record_form(conv.bfloat16(), x.bfloat16(), monkeypatch)
        assert forms == (["gemm"] if units else ["conv"])
        conv.float()
        with torch.autocast("cpu", dtype=torch.bfloat16):  # fp32 input, bf16 autocast: the autocast dtype
            out, forms = run_and_record_form(conv, x, monkeypatch)
        assert forms == (["gemm"] if units else ["conv"]) and out.dtype == torch.bfloat16
        conv.tap_gemm = True  # forced, also in fp32
        out, forms = run_and_record_form(conv, x, monkeypatch)
    assert forms == ["gemm"]
    torch.testing.assert_close(out, F.conv2d(x, conv.weight, padding=3, dilation=3), rtol=1e-5, atol=1e-5)


def test_same_parameters_and_state_dict_as_a_conv2d():
    conv = DilatedConv2d(8, 4, dilation=12)
    plain = nn.Conv2d(8, 4, 3, padding=12, dilation=12, bias=False)
    assert isinstance(conv, nn.Conv2d)
    assert {k: v.shape for k, v in conv.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}
    plain.load_state_dict(conv.state_dict())
    aspp = ASPP(8, (12, 24, 36), nn.BatchNorm2d, out_ch=4)
    assert [type(b[0]) for b in aspp.branches[1:4]] == [DilatedConv2d] * 3
    assert [b[0].dilation for b in aspp.branches[1:4]] == [(12, 12), (24, 24), (36, 36)]
    assert "branches.1.0.weight" in aspp.state_dict() and "branches.1.0.bias" not in aspp.state_dict()


def tiny_segmentor() -> Segmentor:
    torch.manual_seed(0)
    model = Segmentor(create_backbone("resnest14", output_stride=8), 5, channels=16).eval()
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # statistics that make folding do something
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return model


def set_form(model: nn.Module, tap_gemm: bool | None) -> int:
    convs = [m for m in model.modules() if isinstance(m, DilatedConv2d)]
    for m in convs:
        m.tap_gemm = tap_gemm
    return len(convs)


def test_folded_segmentor_gives_the_same_logits_in_either_form():
    """BatchNorm folds into the GEMM form's conv as into the plain one (it gains a bias there)."""
    model = tiny_segmentor()
    x = torch.randn(2, 3, 120, 104)  # 15 x 13 features: the rates 24 and 36 skip taps
    with torch.no_grad():
        expected = model(x)["out"]
        assert fold_batchnorm(model, torch.randn(1, 3, 64, 64)) > 0
        assert set_form(model, True) == 3
        assert all(m.bias is not None for m in model.modules() if isinstance(m, DilatedConv2d))
        torch.testing.assert_close(model(x)["out"], expected, rtol=1e-4, atol=1e-4)
        model.to(memory_format=torch.channels_last)
        torch.testing.assert_close(model(x)["out"], expected, rtol=1e-4, atol=1e-4)


def test_training_under_bf16_autocast_matches_the_convolution():
    """Gradients of the GEMM form under bf16 autocast against autograd of the plain convolution
    under the same autocast, and both against fp32."""
    model = ASPP(32, (2, 6, 12), nn.BatchNorm2d, out_ch=8, dropout=0.0).train()
    x = torch.randn(2, 32, 9, 10, generator=torch.Generator().manual_seed(4))
    grads = {}
    for form in ("fp32", "conv", "gemm"):
        set_form(model, form == "gemm")
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=form != "fp32"):
            out = model(x)
        out.float().square().mean().backward()
        grads[form] = [p.grad.clone() for p in model.parameters()]
    for fp32, conv, gemm in zip(grads["fp32"], grads["conv"], grads["gemm"]):
        scale = fp32.abs().max().item() + 1e-8
        conv_error = (conv - fp32).abs().max().item()
        assert (gemm - fp32).abs().max().item() <= max(2 * conv_error, 0.02 * scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_compile_keeps_the_results(dtype):
    conv = DilatedConv2d(16, 8, dilation=6).to(dtype)
    conv.tap_gemm = True
    x = torch.randn(2, 16, 11, 9).to(dtype).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = F.conv2d(x.float(), conv.weight.float(), padding=6, dilation=6)
        got = torch.compile(conv, fullgraph=True)(x)
    tolerance = 1e-4 if dtype == torch.float32 else 0.05 * expected.abs().max().item()
    torch.testing.assert_close(got.float(), expected, rtol=0, atol=tolerance)


class _Head(nn.Module):
    """The ASPP with its dilated convs forced into the GEMM form (where they are used at all)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.aspp = ASPP(8, (2, 6, 12), nn.BatchNorm2d, out_ch=4)
        set_form(self.aspp, True)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.aspp(x)


def reference_head(head: _Head, x: torch.Tensor) -> torch.Tensor:
    set_form(head.aspp, False)
    try:
        with torch.no_grad():
            return head(x)
    finally:
        set_form(head.aspp, True)


def test_torchscript_trace_records_the_convolution_for_any_size():
    head = _Head()
    with torch.no_grad():
        traced = torch.jit.trace(head, torch.randn(1, 8, 7, 9), check_trace=False)
        ops = [node.kind() for node in traced.inlined_graph.nodes()]
        # 1x1 branch, three dilated branches, pooling branch, projection: convolutions, no GEMMs.
        assert ops.count("aten::_convolution") == 6 and not {"aten::mm", "aten::bmm", "aten::addmm"} & set(ops)
        for shape in [(2, 8, 15, 13), (1, 8, 3, 30)]:
            x = torch.randn(shape)
            torch.testing.assert_close(traced(x), reference_head(head, x), rtol=1e-5, atol=1e-5)


def test_onnx_export_records_the_convolution_and_matches_for_other_sizes(tmp_path):
    head = _Head()
    path = tmp_path / "aspp.onnx"
    dims = {"x": {0: torch.export.Dim.DYNAMIC, 2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC}}
    with torch.no_grad():
        program = torch.onnx.export(head, (torch.randn(2, 8, 14, 16),), input_names=["x"], output_names=["y"],
                                    dynamic_shapes=dims, opset_version=18, dynamo=True)
    program.save(str(path))
    dilations = [tuple(a.ints) for node in program.model_proto.graph.node if node.op_type == "Conv"
                 for a in node.attribute if a.name == "dilations"]
    assert {(2, 2), (6, 6), (12, 12)} <= set(dilations)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in [(1, 8, 5, 27), (3, 8, 20, 9)]:
        x = torch.randn(shape)
        got = session.run(["y"], {"x": x.numpy()})[0]
        np.testing.assert_allclose(got, reference_head(head, x).numpy(), rtol=1e-4, atol=1e-5)
