"""SegmentationLoss: cross-entropy with ignored pixels, the auxiliary term and smp's extra losses."""
import math

import pytest
import torch
import torch.nn.functional as F

from segkit.errors import ConfigError
from segkit.losses import SegmentationLoss, build_loss


@pytest.fixture
def batch():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 8, 8, requires_grad=True)
    target = torch.randint(0, 4, (2, 8, 8))
    target[0, :3] = 255
    return logits, target


def test_main_term_is_cross_entropy_with_ignored_pixels(batch):
    logits, target = batch
    total, parts = SegmentationLoss()({"out": logits}, target)
    expected = F.cross_entropy(logits, target, ignore_index=255)
    torch.testing.assert_close(total, expected)
    assert parts.keys() == {"ce"} and not parts["ce"].requires_grad
    # A plain tensor (an smp model's output) is the main logits.
    torch.testing.assert_close(SegmentationLoss()(logits, target)[0], expected)


def test_aux_term_is_weighted(batch):
    logits, target = batch
    aux = torch.randn_like(logits)
    total, parts = SegmentationLoss(aux_weight=0.4)({"out": logits, "aux": aux}, target)
    ce_aux = F.cross_entropy(aux, target, ignore_index=255)
    torch.testing.assert_close(parts["aux"], ce_aux)
    torch.testing.assert_close(total, F.cross_entropy(logits, target, ignore_index=255) + 0.4 * ce_aux)


@pytest.mark.parametrize("extra", [None, [{"name": "dice"}, {"name": "lovasz"}, {"name": "focal"}]])
def test_all_ignored_batch_gives_zero_loss_and_zero_gradients(extra):
    logits = torch.randn(2, 4, 8, 8, requires_grad=True)
    target = torch.full((2, 8, 8), 255)
    assert math.isnan(F.cross_entropy(logits, target, ignore_index=255).item())  # what is avoided
    total, parts = SegmentationLoss(extra=extra)({"out": logits, "aux": logits * 2}, target)
    assert total.item() == 0 and all(v.item() == 0 for v in parts.values())
    total.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_extra_dice_loss_adds_its_weighted_value(batch):
    import segmentation_models_pytorch as smp

    logits, target = batch
    total, parts = build_loss({"aux_weight": 0.2, "extra": [{"name": "dice", "weight": 0.5}]})(logits, target)
    dice = smp.losses.DiceLoss(mode="multiclass", ignore_index=255)(logits, target)
    torch.testing.assert_close(parts["dice"], dice)
    torch.testing.assert_close(total, parts["ce"] + 0.5 * dice)
    total.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_extra_loss_options_are_passed_to_smp(batch):
    import segmentation_models_pytorch as smp

    logits, target = batch
    _, parts = SegmentationLoss(extra=[{"name": "focal", "weight": 1.0, "gamma": 0.5}])(logits, target)
    focal = smp.losses.FocalLoss(mode="multiclass", ignore_index=255, gamma=0.5)(logits, target)
    torch.testing.assert_close(parts["focal"], focal)
    assert not torch.allclose(focal, smp.losses.FocalLoss(mode="multiclass", ignore_index=255)(logits, target))


@pytest.mark.parametrize("cfg, match", [
    ({"extra": [{"name": "tversky"}]}, "unknown extra loss 'tversky'; valid choices: dice, lovasz, focal"),
    ({"extra": ["dice"]}, "a mapping like"),
    ({"extra": [{"name": "dice"}, {"name": "dice"}]}, "twice"),
    ({"extra": [{"name": "dice", "weight": -1}]}, "weight"),
    ({"extra": [{"name": "dice", "smoothing": 1}]}, "smoothing"),
    ({"aux_weight": -0.1}, "aux_weight"),
    ({"aux": 0.4}, r"unknown loss option\(s\) \['aux'\]; valid choices: aux_weight, ignore_index, extra"),
])
def test_bad_config_raises_config_error(cfg, match):
    with pytest.raises(ConfigError, match=match):
        build_loss(cfg)
