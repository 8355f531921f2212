"""DeepLabV3 + aux FCN head as the original code describes them."""
import copy

import pytest
import torch
from torch import nn

from segkit.settings import BackboneSettings, ModelSettings
from segkit.training.losses import SegmentationLoss
from segkit.models.heads import ASPP_RATES
from segkit.models.resnest import create_backbone
from segkit.models.segmentor import Segmentor, build_segmentor, resize_logits

MODEL_CFG = ModelSettings()


@pytest.mark.parametrize("output_stride", [8, 16])
def test_logits_at_input_size_and_aux_only_in_training(output_stride):
    model = Segmentor(create_backbone("resnest14", output_stride=output_stride), num_classes=7)
    x = torch.randn(2, 3, 64, 80)
    out = model.train()(x)
    # Training: at the heads' resolution (the loss upsamples them).
    small = (2, 7, 64 // output_stride, 80 // output_stride)
    assert set(out) == {"out", "aux"} and out["out"].shape == out["aux"].shape == small
    with torch.no_grad():
        out = model.eval()(x)
    assert set(out) == {"out"} and out["out"].shape == (2, 7, 64, 80)
    rates = [b[0].dilation[0] for b in model.head.aspp.branches[1:4]]
    assert tuple(rates) == ASPP_RATES[output_stride] == {8: (12, 24, 36), 16: (6, 12, 18)}[output_stride]


def test_head_structure_matches_reference():
    model = Segmentor(create_backbone("resnest14", output_stride=8), num_classes=150)
    aspp = model.head.aspp
    assert len(aspp.branches) == 5
    assert [b[0].out_channels for b in aspp.branches[:4]] + [aspp.branches[4].conv.out_channels] == [256] * 5
    assert aspp.branches[0][0].in_channels == 2048 and aspp.project[0][0].in_channels == 1280
    assert isinstance(aspp.project[1], nn.Dropout2d) and aspp.project[1].p == 0.5
    assert model.head.block[0][0].kernel_size == (3, 3) and model.head.block[1].p == 0.1
    assert model.head.classifier.out_channels == 150 and model.head.classifier.bias is not None
    assert model.aux_head.block[0][0].in_channels == 1024 and model.aux_head.block[0][0].out_channels == 256
    assert model.aux_head.classifier.out_channels == 150


def test_batch_of_one_training_step():
    torch.manual_seed(0)
    model = build_segmentor(BackboneSettings(name="resnest14", output_stride=8), MODEL_CFG, 4).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    out = model(torch.randn(1, 3, 48, 48))
    loss, _ = SegmentationLoss()(out, torch.randint(0, 4, (1, 48, 48)))
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)


def test_image_pooling_branch_works_for_batch_of_one_in_eval():
    model = Segmentor(create_backbone("resnest14", output_stride=16), num_classes=3).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32))["out"].shape == (1, 3, 32, 32)


def test_stride_32_is_rejected():
    with pytest.raises(ValueError, match="output_stride of 8 or 16, got 32"):
        Segmentor(create_backbone("resnest14", output_stride=32), num_classes=3)


def test_without_aux_head():
    model = build_segmentor(BackboneSettings(name="resnest14", output_stride=16), ModelSettings(aux=False), 3)
    assert model.aux_head is None and set(model.train()(torch.randn(2, 3, 32, 32))) == {"out"}


def test_syncbn_trained_checkpoint_loads_for_cpu_inference(tmp_path):
    import copy

    from segkit.models.pretrained import read_state_dict
    torch.manual_seed(0)
    model = Segmentor(create_backbone("resnest14", output_stride=8), num_classes=3, channels=16)
    # What a multi-GPU run trains (conversion itself needs no GPU; its forward would).
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
    assert any(isinstance(m, nn.SyncBatchNorm) for m in synced.modules())
    torch.save({"model": synced.state_dict()}, tmp_path / "sync.pt")
    restored = Segmentor(create_backbone("resnest14", output_stride=8), num_classes=3, channels=16)
    restored.load_state_dict(read_state_dict(tmp_path / "sync.pt"), strict=True)
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in restored.modules())
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(restored.eval()(x)["out"], model.eval()(x)["out"])


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("loss_options", [{}, {"ohem": {"thresh": 0.7, "min_kept": 100}, "class_weights": [1, 2, 3, 4, 5]}],
                         ids=["ce", "ohem-weighted"])
def test_training_at_head_resolution_is_the_step_upsampled_in_the_model(amp, loss_options):
    # The loss upsamples the training logits (and again in backward) instead of the model: the
    # loss and every gradient are bitwise those of upsampling in the model, as segkit did before.
    torch.manual_seed(0)
    model = Segmentor(create_backbone("resnest14", output_stride=8), 5, channels=16)
    x = torch.randn(2, 3, 50, 44)
    target = torch.randint(0, 5, (2, 50, 44))
    target[0, :9] = 255
    steps = []
    for upsample_in_model in (False, True):
        net = copy.deepcopy(model).train()
        torch.manual_seed(3)
        with torch.autocast("cpu", torch.bfloat16, enabled=amp):
            out = net(x)
            if upsample_in_model:
                out = {k: resize_logits(v, x.shape[-2:], True) for k, v in out.items()}
            loss = SegmentationLoss(**loss_options)(out, target)[0]
        loss.backward()
        steps.append((loss.detach(), {n: p.grad for n, p in net.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = steps
    assert torch.equal(loss_a, loss_b)
    for name, grad in grads_a.items():
        assert torch.equal(grad, grads_b[name]), name
