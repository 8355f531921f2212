"""Activation checkpointing (train.grad_checkpointing): the same step as without it, less kept.

"The same" is exact here: the recomputation runs the same CPU kernels on the same inputs, so the
loss, every gradient, the BatchNorm running statistics and the RNG state after the step are
bitwise equal to the run without checkpointing.
"""
import copy

import pytest
import torch

import segkit.models.checkpointing as checkpointing
from bench.memory import training_forward_bytes
from segkit.losses import SegmentationLoss
from segkit.models.resnest import create_backbone
from segkit.models.segmentor import Segmentor


def _model() -> Segmentor:
    torch.manual_seed(0)
    # Dropout everywhere the recipe has it (ASPP 0.5, heads 0.1): the recomputation must redraw
    # the same masks.
    return Segmentor(create_backbone("resnest14", output_stride=8), 5, channels=16)


def _step(model: Segmentor, enable: bool, amp: bool) -> dict:
    model = copy.deepcopy(model).train()
    model.set_grad_checkpointing(enable)
    images = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    masks = torch.randint(0, 5, (2, 48, 48), generator=torch.Generator().manual_seed(2))
    masks[0, :8] = 255
    torch.manual_seed(3)
    with torch.autocast("cpu", torch.bfloat16, enabled=amp):
        loss, _ = SegmentationLoss(aux_weight=0.2)(model(images), masks)
    loss.backward()
    return {"loss": loss.detach(), "grads": {n: p.grad for n, p in model.named_parameters()},
            "buffers": {n: b.clone() for n, b in model.named_buffers()}, "rng": torch.get_rng_state()}


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16-autocast"])
def test_checkpointed_step_equals_the_plain_one(amp):
    model = _model()
    plain, checkpointed = _step(model, False, amp), _step(model, True, amp)
    assert torch.equal(plain["loss"], checkpointed["loss"])
    assert plain["grads"].keys() == checkpointed["grads"].keys()
    for name, grad in plain["grads"].items():
        assert torch.equal(grad, checkpointed["grads"][name]), name
    for name, buffer in plain["buffers"].items():  # running mean/var and num_batches_tracked
        assert torch.equal(buffer, checkpointed["buffers"][name]), name
    assert torch.equal(plain["rng"], checkpointed["rng"])  # the next dropout masks are unaffected


def test_without_restoring_the_buffers_batchnorm_would_count_the_batch_twice(monkeypatch):
    # What checkpointing.py guards against: the recomputation is a second training-mode forward.
    monkeypatch.setattr(checkpointing._KeepBuffers, "__enter__", lambda self: None)
    monkeypatch.setattr(checkpointing._KeepBuffers, "__exit__", lambda self, *exc: None)
    model = _model()
    plain, checkpointed = _step(model, False, False), _step(model, True, False)
    assert not torch.equal(plain["buffers"]["backbone.bn1.num_batches_tracked"],
                           checkpointed["buffers"]["backbone.bn1.num_batches_tracked"])


def test_checkpointing_only_acts_while_gradients_are_computed():
    model = _model().eval()
    model.set_grad_checkpointing(True)
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        out = model(x)["out"]
    model.set_grad_checkpointing(False)
    with torch.no_grad():
        assert torch.equal(out, model(x)["out"])


@pytest.mark.parametrize("amp", [None, torch.bfloat16], ids=["fp32", "bf16-autocast"])
def test_checkpointing_keeps_a_fraction_of_the_activations(amp):
    def build(enable):
        def model():
            m = Segmentor(create_backbone("resnest14", output_stride=8), 150)
            m.set_grad_checkpointing(enable)
            return m
        return model

    loss = SegmentationLoss(aux_weight=0.2)
    criterion = lambda out, masks: loss(out, masks)[0]  # noqa: E731
    plain = training_forward_bytes(build(False), criterion, 2, 128, 150, amp=amp)
    kept = training_forward_bytes(build(True), criterion, 2, 128, 150, amp=amp)
    # The blocks' inputs and the loss's logits remain; no weight is kept (they are recomputed too).
    assert kept.total < 0.3 * plain.total and kept.parameters == 0
