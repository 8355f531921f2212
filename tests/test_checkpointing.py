"""Recomputation in backward (train.grad_checkpointing, train.selective_recompute): the same step as
without it, less kept.

"The same" is exact here: the recomputation runs the same CPU kernels on the same inputs, so the
loss, every gradient, the BatchNorm running statistics and the RNG state after the step are
bitwise equal to the run without recomputation.
"""
import copy

import pytest
import torch

import segkit.models.checkpointing as checkpointing
from bench.memory import training_forward_bytes
from segkit.training.losses import SegmentationLoss
from segkit.models.resnest import BACKBONES, create_backbone
from segkit.models.segmentor import Segmentor

MODES = ("full", "selective")


def _model(backbone: str = "resnest14") -> Segmentor:
    torch.manual_seed(0)
    # Dropout everywhere the recipe has it (ASPP 0.5, heads 0.1): the recomputation must redraw
    # the same masks.
    return Segmentor(create_backbone(backbone, output_stride=8), 5, channels=16)


def _set_mode(model: Segmentor, mode: str) -> None:
    model.set_grad_checkpointing(mode == "full")
    model.set_selective_recompute(mode == "selective")


def _step(model: Segmentor, mode: str, amp: bool) -> dict:
    model = copy.deepcopy(model).train()
    _set_mode(model, mode)
    images = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    masks = torch.randint(0, 5, (2, 48, 48), generator=torch.Generator().manual_seed(2))
    masks[0, :8] = 255
    torch.manual_seed(3)
    with torch.autocast("cpu", torch.bfloat16, enabled=amp):
        loss, _ = SegmentationLoss(aux_weight=0.2)(model(images), masks)
    loss.backward()
    return {"loss": loss.detach(), "grads": {n: p.grad for n, p in model.named_parameters()},
            "buffers": {n: b.clone() for n, b in model.named_buffers()}, "rng": torch.get_rng_state()}


def _assert_same_step(plain: dict, other: dict) -> None:
    assert torch.equal(plain["loss"], other["loss"])
    assert plain["grads"].keys() == other["grads"].keys()
    for name, grad in plain["grads"].items():
        assert torch.equal(grad, other["grads"][name]), name
    for name, buffer in plain["buffers"].items():  # running mean/var and num_batches_tracked
        assert torch.equal(buffer, other["buffers"][name]), name
    assert torch.equal(plain["rng"], other["rng"])  # the next dropout masks are unaffected


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16-autocast"])
def test_recomputed_step_equals_the_plain_one(mode, amp):
    model = _model()
    _assert_same_step(_step(model, "none", amp), _step(model, mode, amp))


# Every block layout: radix 0 (ResNet-D), 1 and 4, cardinality 2, the avd pool before or after the
# 3x3 conv. (The deeper variants repeat these blocks.)
@pytest.mark.parametrize("backbone", ["resnet50d", "resnest50_fast_1s1x64d", "resnest50_fast_4s1x64d",
                                      "resnest50_fast_2s2x40d", "resnest26"])
def test_selective_recompute_is_exact_for_every_block_layout(backbone):
    assert backbone in BACKBONES
    model = _model(backbone)
    _assert_same_step(_step(model, "none", False), _step(model, "selective", False))


@pytest.mark.parametrize("mode", MODES)
def test_without_restoring_the_buffers_batchnorm_would_count_the_batch_twice(monkeypatch, mode):
    # What checkpointing.py guards against: the recomputation is a second training-mode forward.
    monkeypatch.setattr(checkpointing._KeepBuffers, "__enter__", lambda self: None)
    monkeypatch.setattr(checkpointing._KeepBuffers, "__exit__", lambda self, *exc: None)
    model = _model()
    plain, recomputed = _step(model, "none", False), _step(model, mode, False)
    assert not torch.equal(plain["buffers"]["backbone.bn1.num_batches_tracked"],
                           recomputed["buffers"]["backbone.bn1.num_batches_tracked"])


@pytest.mark.parametrize("mode", MODES)
def test_recomputation_only_acts_while_gradients_are_computed(mode):
    model = _model().eval()
    _set_mode(model, mode)
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        out = model(x)["out"]
    _set_mode(model, "none")
    with torch.no_grad():
        assert torch.equal(out, model(x)["out"])


def test_an_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="unknown recompute mode 'partial'; valid choices: none, selective, full"):
        checkpointing.recomputed(torch.relu, torch.ones(2, requires_grad=True), mode="partial")


def test_grad_checkpointing_takes_precedence_over_selective_recompute():
    model = _model()
    model.set_selective_recompute(True)
    model.set_grad_checkpointing(True)
    assert model.backbone.recompute_mode == "full"
    model.set_grad_checkpointing(False)
    assert model.backbone.recompute_mode == "selective"


@pytest.mark.parametrize("amp", [None, torch.bfloat16], ids=["fp32", "bf16-autocast"])
def test_recomputation_keeps_a_fraction_of_the_activations(amp):
    def build(mode):
        def model():
            m = Segmentor(create_backbone("resnest14", output_stride=8), 150)
            _set_mode(m, mode)
            return m
        return model

    loss = SegmentationLoss(aux_weight=0.2)
    criterion = lambda out, masks: loss(out, masks)[0]  # noqa: E731
    plain, selective, full = (training_forward_bytes(build(mode), criterion, 2, 128, 150, amp=amp)
                              for mode in ("none", "selective", "full"))
    # Full: the blocks' inputs and the loss's logits remain; no weight is kept (they are recomputed too).
    assert full.total < 0.3 * plain.total and full.parameters == 0
    # Selective: the ReLU outputs and the mixed splits are gone (and the weights, or their bf16
    # copies, which the recomputation reads again). The conv outputs it caches are counted (they
    # pass the measuring hooks), so it keeps more than full checkpointing.
    assert selective.total - selective.parameters < 0.8 * (plain.total - plain.parameters)
    assert selective.total > 1.5 * full.total
