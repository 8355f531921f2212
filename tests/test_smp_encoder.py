"""segkit's backbones as smp encoders: features contract, smp decoders on top, weights, registration."""
import subprocess
import sys

import pytest
import torch
from torchvision.ops import FrozenBatchNorm2d

smp = pytest.importorskip("segmentation_models_pytorch")

import segkit.models.pretrained as pretrained  # noqa: E402
from segkit.errors import CheckpointError  # noqa: E402
from segkit.models.norm import get_norm_layer  # noqa: E402
from segkit.models.resnest import create_backbone  # noqa: E402
from segkit.models.smp_encoder import SegkitEncoder, register_smp_encoders  # noqa: E402

NAME = "segkit_resnest14"


def test_importing_segkit_does_not_import_smp():
    code = ("import sys, segkit, segkit.models.resnest, segkit.models.pretrained, segkit.training.losses; "
            "sys.exit('segmentation_models_pytorch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.parametrize("output_stride, reductions", [
    (32, [1, 2, 4, 8, 16, 32]), (16, [1, 2, 4, 8, 16, 16]), (8, [1, 2, 4, 8, 8, 8])])
def test_features_match_the_backbone_built_with_that_output_stride(output_stride, reductions):
    backbone = create_backbone("resnest14", output_stride=output_stride).eval()
    encoder = smp.encoders.get_encoder(NAME, weights=None, output_stride=output_stride).eval()
    assert isinstance(encoder, SegkitEncoder)
    # Same keys: a segkit backbone checkpoint loads into the smp encoder as it is.
    assert encoder.state_dict().keys() == backbone.state_dict().keys()
    encoder.load_state_dict(backbone.state_dict())
    assert encoder.out_channels == [3, 64, 256, 512, 1024, 2048]
    assert encoder.output_stride == output_stride
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        features = encoder(x)
        expected = backbone(x)
    assert [32 // f.shape[-1] for f in features] == reductions
    assert [f.shape[1] for f in features] == encoder.out_channels
    assert features[0] is x
    for got, want in zip(features[2:], expected):
        torch.testing.assert_close(got, want)


def test_shallow_encoder_builds_only_the_stages_it_uses():
    # Extra keyword arguments (which smp models pass on) reach create_backbone.
    encoder = smp.encoders.get_encoder(NAME, depth=3, weights=None, norm_layer=get_norm_layer("frozen_bn"))
    assert encoder.out_channels == [3, 64, 256, 512]
    assert not hasattr(encoder, "layer3") and not hasattr(encoder, "layer4")
    assert isinstance(encoder.bn1, FrozenBatchNorm2d)
    assert [f.shape[-1] for f in encoder(torch.randn(1, 3, 32, 32))] == [32, 16, 8, 4]


def test_deeplabv3plus_trains():
    torch.manual_seed(0)
    model = smp.DeepLabV3Plus(encoder_name=NAME, encoder_weights=None, encoder_output_stride=16,
                              decoder_channels=32, classes=3).train()
    x, target = torch.randn(2, 3, 64, 64), torch.randint(0, 3, (2, 64, 64))
    logits = model(x)
    assert logits.shape == (2, 3, 64, 64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.encoder.conv1[0].weight.detach().clone()
    torch.nn.functional.cross_entropy(logits, target).backward()
    assert all(p.grad is not None for p in model.encoder.parameters())
    optimizer.step()
    assert not torch.equal(before, model.encoder.conv1[0].weight)


@pytest.mark.parametrize("arch, kwargs", [
    ("FPN", dict(decoder_pyramid_channels=32, decoder_segmentation_channels=32)),
    ("Unet", dict(decoder_channels=(32, 16, 16, 8, 8))),
    ("DeepLabV3", dict(encoder_output_stride=8, decoder_channels=32)),
])
def test_other_architectures_run(arch, kwargs):
    model = getattr(smp, arch)(encoder_name=NAME, encoder_weights=None, classes=2, **kwargs).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 2, 64, 64)


def test_imagenet_weights_load_through_segkit(tmp_path, monkeypatch):
    torch.manual_seed(1)
    released = create_backbone("resnest14", num_classes=1000)  # as released: with the classifier
    path = tmp_path / "resnest14.pth"
    torch.save(released.state_dict(), path)
    # load_pretrained reads local paths directly: the test never reaches the network.
    monkeypatch.setitem(pretrained.IMAGENET_URLS, "resnest14", str(path))
    model = smp.DeepLabV3Plus(encoder_name=NAME, encoder_weights="imagenet", classes=2)
    for key, value in model.encoder.state_dict().items():
        assert torch.equal(value, released.state_dict()[key]), key
    # A file path works as encoder_weights too; a pretrained stem is adapted to other channel counts.
    encoder = smp.encoders.get_encoder(NAME, in_channels=1, weights=str(path))
    torch.testing.assert_close(encoder.conv1[0].weight, released.conv1[0].weight.sum(1, keepdim=True))


def test_unavailable_weights_and_bad_names_are_user_errors():
    with pytest.raises(CheckpointError, match="no published ImageNet weights"):
        smp.encoders.get_encoder("segkit_resnet50d", weights="imagenet")
    with pytest.raises(ValueError, match="encoder 'segkit_resnest51'; valid choices: .*segkit_resnest50"):
        smp.Unet(encoder_name="segkit_resnest51", encoder_weights=None)
    with pytest.raises(ValueError, match="depth must be one of"):
        smp.encoders.get_encoder(NAME, depth=6)
    with pytest.raises(ValueError, match="output_stride"):
        smp.encoders.get_encoder(NAME, output_stride=4)


def test_registration_is_idempotent_and_leaves_smp_encoders_alone():
    routed = smp.encoders.get_encoder
    register_smp_encoders()
    register_smp_encoders()
    assert smp.encoders.get_encoder is routed
    assert smp.decoders.unet.model.get_encoder is routed
    assert NAME in smp.encoders.get_encoder_names()
    # The registry entry alone (smp's unwrapped function, which calls make_dilated) builds it too.
    encoder = routed.__wrapped__(NAME, depth=4, weights=None, output_stride=8)
    assert isinstance(encoder, SegkitEncoder) and encoder.output_stride == 8
    with pytest.raises(ValueError, match="built with output_stride 8"):
        encoder.make_dilated(16)
    # smp's own encoders still go through smp's own function.
    assert smp.encoders.get_encoder("resnet18", weights=None).out_channels == [3, 64, 64, 128, 256, 512]
