"""Folding BatchNorm into convolutions for inference, and the evaluation model set-up around it."""
import pytest
import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from eval_helpers import multiscale
from segkit.inference.multiscale import predict_single
from segkit.inference.options import InferenceOptions
from segkit.inference.prepare import prepare_model
from segkit.models.bn_fold import fold_batchnorm
from segkit.models.norm import get_norm_layer
from segkit.models.resnest import create_backbone
from segkit.models.segmentor import Segmentor


def segmentor(backbone: str = "resnest14", norm: str = "bn") -> Segmentor:
    """A small segmentor whose norm layers are not the identity (random statistics and affine)."""
    torch.manual_seed(0)
    norm_layer = get_norm_layer(norm)
    model = Segmentor(create_backbone(backbone, output_stride=8, norm_layer=norm_layer), 5,
                      norm_layer=norm_layer)
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d, nn.GroupNorm)):
            m.weight.data = torch.rand(m.weight.shape, generator=gen) + 0.5
            m.bias.data = torch.rand(m.bias.shape, generator=gen) - 0.5
        if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)):
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return model.eval()


def norms_in_eval_path(model: nn.Module) -> int:
    aux = set(model.aux_head.modules())
    return sum(isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)) for m in model.modules() if m not in aux)


@pytest.mark.parametrize("backbone,norm", [("resnest14", "bn"), ("resnest14", "frozen_bn"),
                                           ("resnet50d", "bn"), ("resnest50_fast_2s2x40d", "bn"),
                                           ("resnest14", "gn")])
def test_folded_model_gives_the_same_logits(backbone, norm):
    model = segmentor(backbone, norm)
    x = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        expected = model(x)["out"]
    foldable = norms_in_eval_path(model)
    assert fold_batchnorm(model, torch.randn(1, 3, 64, 64)) == foldable
    # Every BatchNorm the eval forward runs is gone (GroupNorm has no running statistics to fold).
    assert norms_in_eval_path(model) == 0
    with torch.no_grad():
        torch.testing.assert_close(model(x)["out"], expected, rtol=1e-4, atol=1e-4)


def test_conv_whose_output_is_also_used_elsewhere_is_refused():
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return self.bn(y) + y  # folding would change the second use of y

    model = Residual()
    model.bn.running_var.fill_(4.0)
    with pytest.raises(RuntimeError, match="used elsewhere"):
        fold_batchnorm(model.eval(), torch.randn(1, 3, 8, 8))


def test_shared_conv_and_reused_norm_are_left_alone():
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.bn_a, self.bn_b, self.bn_c = nn.BatchNorm2d(3), nn.BatchNorm2d(3), nn.BatchNorm2d(3)
            self.conv_c = nn.Conv2d(3, 3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = self.bn_a(self.conv(x))
            b = self.bn_b(self.conv(x))  # the same conv twice: folding both would fold it twice
            c = self.bn_c(self.conv_c(x)) + self.bn_c(self.conv_c(a))  # a norm applied twice
            return a + b + c

    model = Shared().eval()
    for bn in (model.bn_a, model.bn_b, model.bn_c):
        bn.running_mean.fill_(0.3)
    assert fold_batchnorm(model, torch.randn(1, 3, 4, 4)) == 0
    assert all(isinstance(m, nn.BatchNorm2d) for m in (model.bn_a, model.bn_b, model.bn_c))


def test_fold_needs_eval_mode():
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(segmentor().train(), torch.randn(1, 3, 64, 64))


@torch.inference_mode()
def test_prepared_model_predicts_as_the_plain_one():
    plain = segmentor()
    prepared = prepare_model(segmentor(), "cpu")
    assert not prepared.training
    assert prepared.head.classifier.weight.is_contiguous(memory_format=torch.channels_last)
    image = torch.randn(3, 40, 52)
    expected = multiscale(plain, image, [0.75, 1.0, 1.5], True, 48, 32, 5)
    got = multiscale(prepared, image, [0.75, 1.0, 1.5], True, 48, 32, 5)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@torch.inference_mode()
def test_compiled_model_predicts_as_the_plain_one():
    # One input shape, one compilation (tens of seconds on two cores).
    plain = segmentor()
    compiled = prepare_model(segmentor(), "cpu", InferenceOptions(compile=True))
    image = torch.randn(3, 48, 64)
    torch.testing.assert_close(predict_single(compiled, image), predict_single(plain, image), rtol=1e-4, atol=1e-4)
