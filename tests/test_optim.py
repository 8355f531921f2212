"""The recipe's optimizer and schedule: linear lr scaling, 10x heads, poly decay per iteration."""
from dataclasses import replace
import pytest

from segkit.training.optim import build_optimizer, build_scheduler, poly_factor, scaled_lr
from segkit.settings import OptimSettings, ScheduleSettings
from segkit.models.resnest import create_backbone
from segkit.models.segmentor import Segmentor

SGD = OptimSettings(base_lr=0.01, base_batch_size=16, momentum=0.9, weight_decay=1e-4, head_lr_mult=10.0)


@pytest.fixture(scope="module")
def model():
    return Segmentor(create_backbone("resnest14", output_stride=8), num_classes=5)


@pytest.mark.parametrize("batch,expected", [(16, 0.01), (8, 0.005), (32, 0.02), (2, 0.00125)])
def test_linear_lr_scaling(batch, expected):
    assert scaled_lr(SGD, batch) == pytest.approx(expected)


def test_heads_get_ten_times_the_backbone_lr(model):
    opt = build_optimizer(model, SGD, batch_size=8)
    backbone, head = opt.param_groups
    assert backbone["lr"] == pytest.approx(0.005) and head["lr"] == pytest.approx(0.05)
    assert {id(p) for p in backbone["params"]} == {id(p) for p in model.backbone.parameters()}
    heads = list(model.head.parameters()) + list(model.aux_head.parameters())
    assert {id(p) for p in head["params"]} == {id(p) for p in heads}
    assert opt.defaults["momentum"] == 0.9 and opt.defaults["weight_decay"] == 1e-4


def test_poly_schedule_per_iteration(model):
    opt = build_optimizer(model, SGD, batch_size=16)
    total = 10
    sched = build_scheduler(opt, ScheduleSettings(power=0.9), total)
    seen = []
    for _ in range(total):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    for it, (lr_backbone, lr_head) in enumerate(seen):
        factor = (1 - it / total) ** 0.9
        assert lr_backbone == pytest.approx(0.01 * factor) and lr_head == pytest.approx(0.1 * factor)
    assert opt.param_groups[0]["lr"] == 0.0


def test_warmup_then_poly():
    assert [poly_factor(i, 100, 0.9, 4) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert poly_factor(4, 100, 0.9, 4) == pytest.approx(0.96 ** 0.9)


def test_unknown_optimizer_and_schedule(model):
    with pytest.raises(ValueError, match="unknown optimizer 'adam'; valid choices: sgd"):
        build_optimizer(model, replace(SGD, name="adam"), 16)
    opt = build_optimizer(model, SGD, 16)
    with pytest.raises(ValueError, match="unknown schedule 'cosine'; valid choices: poly"):
        build_scheduler(opt, ScheduleSettings(name="cosine", power=1), 10)
