"""bench/memory.py: bytes saved for backward, each storage once, the same on fake and real tensors."""
import pytest
import torch
import torch.nn.functional as F

from torch import nn

from bench.memory import saved_bytes, training_forward_bytes
from segkit.training.losses import SegmentationLoss
from segkit.models.resnest import create_backbone
from segkit.models.segmentor import Segmentor


def test_a_storage_is_counted_once_however_many_views_are_saved():
    x = torch.randn(256, requires_grad=True)
    w = torch.randn(256, requires_grad=True)

    def forward():
        a = x.exp()                   # saves its result (1 KiB)
        (a * a).sum()                 # saves a twice: the same storage
        (a[:128] * w[:128]).sum()     # a view of a, and a view of the parameter w

    saved = saved_bytes(forward, [w])
    assert saved == type(saved)(total=2 * 1024, parameters=1024)


class _Peer(nn.Module):
    def __init__(self):
        super().__init__()
        import segmentation_models_pytorch as smp
        self.net = smp.DeepLabV3(encoder_name="tu-resnest14d", encoder_weights=None, encoder_output_stride=8,
                                 classes=7)

    def forward(self, x):
        return {"out": self.net(x)}


def _segkit(mode):
    model = Segmentor(create_backbone("resnest14", output_stride=8), 7)
    model.set_grad_checkpointing(mode == "full")
    model.set_selective_recompute(mode == "selective")
    return model


def _segkit_loss(out, masks):
    return SegmentationLoss(aux_weight=0.2)(out, masks)[0]


def _peer_loss(out, masks):
    return F.cross_entropy(out["out"], masks, ignore_index=255)


@pytest.mark.parametrize("stack, criterion", [(lambda: _segkit("none"), _segkit_loss),
                                              (lambda: _segkit("selective"), _segkit_loss),
                                              (lambda: _segkit("full"), _segkit_loss), (_Peer, _peer_loss)],
                         ids=["segkit", "segkit-selective", "segkit-checkpointed", "peer"])
@pytest.mark.parametrize("amp", [None, torch.bfloat16], ids=["fp32", "bf16-autocast"])
def test_fake_tensors_save_what_the_real_run_saves(stack, criterion, amp):
    def build():
        torch.manual_seed(0)
        return stack()

    fake = training_forward_bytes(build, criterion, 2, 48, 7, amp=amp, fake=True)
    real = training_forward_bytes(build, criterion, 2, 48, 7, amp=amp, fake=False)
    assert fake.parameters == real.parameters
    if amp is None:
        assert fake.total == real.total
    else:
        # BatchNorm's per-channel batch statistics are float32 on real CPU kernels and bf16 on fake
        # ones (a few KiB): the only difference.
        assert abs(fake.total - real.total) <= 0.005 * real.total
