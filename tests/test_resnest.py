"""The ResNeSt family against the paper and against timm as an independent implementation."""
import copy

import pytest
import timm
import torch
from torch import nn

from segkit.models.norm import NORM_LAYERS, get_norm_layer
from segkit.models.resnest import BACKBONES, Bottleneck, SplitAttention, create_backbone

SMALL = ["resnest14", "resnest26", "resnest50", "resnet50d", "resnest50_fast_2s2x40d"]


def _params_m(name: str, **kwargs) -> float:
    # Meta tensors: counts the deep variants without allocating their weights.
    with torch.device("meta"):
        model = create_backbone(name, **kwargs)
    return sum(p.numel() for p in model.parameters()) / 1e6


@pytest.mark.parametrize("name,expected", [("resnest50", 27.5), ("resnest101", 48), ("resnest200", 70),
                                           ("resnest269", 111)])
def test_parameter_counts_match_paper_table2(name, expected):
    # The paper quotes one decimal for -50 and whole millions beyond.
    digits = 1 if expected % 1 else 0
    assert round(_params_m(name, num_classes=1000), digits) == expected


@pytest.mark.parametrize("name,expected", [("resnet50d", 25.6), ("resnest50_fast_2s1x64d", 27.5),
                                           ("resnest50_fast_4s1x64d", 31.9), ("resnest50_fast_2s2x40d", 26.9),
                                           # the paper prints 26.3; the original layer formula gives 26.22
                                           ("resnest50_fast_1s1x64d", 26.3)])
def test_parameter_counts_match_paper_table1(name, expected):
    assert abs(_params_m(name, num_classes=1000) - expected) <= 0.1


@pytest.mark.parametrize("name", list(BACKBONES))
@pytest.mark.parametrize("output_stride", [8, 16, 32])
def test_every_variant_builds_with_expected_feature_geometry(name, output_stride):
    with torch.device("meta"):
        model = create_backbone(name, output_stride=output_stride)
        feats = model(torch.empty(2, 3, 64, 64))
    assert [f.shape[1] for f in feats] == model.feature_channels == [256, 512, 1024, 2048]
    assert [64 // f.shape[-1] for f in feats] == model.feature_strides
    assert model.feature_strides == {8: [4, 8, 8, 8], 16: [4, 8, 16, 16], 32: [4, 8, 16, 32]}[output_stride]


@pytest.mark.parametrize("ours,theirs", [("resnest14", "resnest14d"), ("resnest50", "resnest50d"),
                                         ("resnest101", "resnest101e"), ("resnet50d", "resnet50d")])
def test_stride32_equals_timm(ours, theirs):
    torch.manual_seed(0)
    ref = timm.create_model(theirs, pretrained=False).eval()
    model = create_backbone(ours, num_classes=1000).eval()
    model.load_state_dict(ref.state_dict(), strict=True)  # same keys and shapes, classifier included
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        ours_c4, ref_c4 = model(x)[-1], ref.forward_features(x)
        assert torch.allclose(model.forward_head(ours_c4), ref.forward_head(ref_c4), rtol=1e-4, atol=1e-5)
    assert ((ours_c4 - ref_c4).norm() / ref_c4.norm()).item() < 1e-4


@pytest.mark.parametrize("radix,cardinality", [(1, 1), (2, 1), (4, 1), (2, 2)])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_split_attention_inference_path_equals_autograd_path(radix, cardinality, memory_format):
    # Without autograd the splits are mixed by an in-place accumulation instead of a product + sum
    # (the timm comparisons above run that path); both must give the same numbers and gradients flow.
    torch.manual_seed(0)
    layer = SplitAttention(64, 32, radix=radix, cardinality=cardinality).eval().to(memory_format=memory_format)
    x = torch.randn(2, 64, 12, 10).contiguous(memory_format=memory_format).requires_grad_()
    with_grad = layer(x)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), with_grad, rtol=1e-5, atol=1e-6)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x.detach()), with_grad.detach(), rtol=1e-5, atol=1e-6)
    with_grad.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_stride8_differs_from_timm_only_where_reference_says():
    torch.manual_seed(0)
    ref = timm.create_model("resnest50d", pretrained=False, output_stride=8, features_only=True,
                            out_indices=(1, 2, 3, 4)).eval()
    model = create_backbone("resnest50", output_stride=8).eval()
    model.load_state_dict(ref.state_dict(), strict=True)
    for stage in (model.layer3, model.layer4):
        first = stage[0]
        # The original code pools (3x3, stride 1) after the 3x3 conv of a dilated stage's first block.
        assert isinstance(first.avd_layer, nn.AvgPool2d) and first.avd_layer.stride == 1
        assert all(block.avd_layer is None for block in stage[1:])
        assert isinstance(first.downsample[0], nn.Identity)
    assert [model.layer3[0].conv2.conv.dilation, model.layer3[1].conv2.conv.dilation,
            model.layer4[0].conv2.conv.dilation, model.layer4[1].conv2.conv.dilation] == [(1, 1), (2, 2), (2, 2), (4, 4)]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours, theirs = model(x), ref(x)
        assert [o.shape for o in ours] == [t.shape for t in theirs]
        assert not torch.allclose(ours[-1], theirs[-1], atol=1e-3)
        # Undo exactly the two documented differences: outputs become timm's.
        timm_like = copy.deepcopy(model)
        for name in ("layer3", "layer4"):
            first, ref_first = getattr(timm_like, name)[0], getattr(ref, name)[0]
            first.avd_layer = None
            first.downsample[0] = ref_first.downsample[0]
        for o, t in zip(timm_like(x), theirs):
            assert ((o - t).norm() / t.norm()).item() < 1e-4


@pytest.mark.parametrize("name", SMALL)
def test_batch_of_one_trains(name):
    torch.manual_seed(0)
    model = create_backbone(name, output_stride=8).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    attn_bn = [m.conv2.bn1 for m in model.modules() if isinstance(m, Bottleneck) and m.radix > 0]
    before = [bn.running_mean.clone() for bn in attn_bn]
    stem_before = model.bn1.running_mean.clone()
    feats = model(torch.randn(1, 3, 64, 64))
    sum(f.mean() for f in feats).backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # The attention BN sees one value per channel: it normalises with, and keeps, its running stats;
    # every other BN still uses and updates batch statistics.
    assert all(torch.equal(b, bn.running_mean) for b, bn in zip(before, attn_bn))
    assert not torch.equal(stem_before, model.bn1.running_mean)
    if attn_bn:
        assert attn_bn[0].weight.grad.abs().sum() > 0  # the attention branch still learns


def test_batch_of_two_uses_batch_statistics_in_attention():
    model = create_backbone("resnest14").train()
    bn = model.layer1[0].conv2.bn1
    before = bn.running_mean.clone()
    model(torch.randn(2, 3, 32, 32))
    assert not torch.equal(before, bn.running_mean)


@pytest.mark.parametrize("norm", list(NORM_LAYERS))
def test_norm_layer_is_injected_everywhere(norm):
    model = create_backbone("resnest14", output_stride=8, norm_layer=get_norm_layer(norm))
    kinds = {type(m) for m in model.modules()}
    assert type(get_norm_layer(norm)(32)) in kinds
    assert nn.BatchNorm2d not in kinds or norm == "bn"
    out = model.train()(torch.randn(1, 3, 32, 32))
    assert out[-1].shape == (1, 2048, 4, 4)


def test_zero_init_last_makes_blocks_start_as_identity_residuals():
    model = create_backbone("resnest14", zero_init_last=True)
    assert all((m.bn3.weight == 0).all() for m in model.modules() if isinstance(m, Bottleneck))
    default = create_backbone("resnest14")
    assert all((m.bn3.weight == 1).all() for m in default.modules() if isinstance(m, Bottleneck))


def test_traced_and_exported_models_accept_another_batch_size():
    torch.manual_seed(0)
    model = create_backbone("resnest14", output_stride=8).eval()
    x2, x3 = torch.randn(2, 3, 32, 48), torch.randn(3, 3, 32, 48)
    with torch.no_grad():
        expected = model(x3)[-1]
        traced = torch.jit.trace(model, x2, check_trace=False)
        assert torch.allclose(traced(x3)[-1], expected, atol=1e-5)
        batch = torch.export.Dim("batch", min=1, max=64)
        exported = torch.export.export(model, (x2,), dynamic_shapes=({0: batch},))
        assert torch.allclose(exported.module()(x3)[-1], expected, atol=1e-5)


def test_bad_names_and_strides_are_config_errors():
    with pytest.raises(ValueError, match="resnest101.*resnet50d"):
        create_backbone("resnest102")
    with pytest.raises(ValueError, match=r"output_stride must be one of \[8, 16, 32\], got 4"):
        create_backbone("resnest14", output_stride=4)
    with pytest.raises(ValueError, match="valid choices: bn, frozen_bn, gn"):
        get_norm_layer("syncbatchnorm")


def test_classifier_only_when_requested():
    assert create_backbone("resnest14").fc is None
    with pytest.raises(RuntimeError, match="without a classifier"):
        create_backbone("resnest14").forward_head(torch.randn(1, 2048, 1, 1))
