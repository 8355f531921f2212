"""Whole-image, sliding-window and multi-scale + flip inference, and single-process evaluation.

The stubs (tests/eval_helpers.py) make the expected outputs derivable independently;
bench/naive.py's one-window-one-flip-at-a-time loop is what the batched implementation must reproduce.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bench.naive import naive_multiscale
from eval_helpers import MEAN, STD, ConvNet, FakeDataset, PixelNet, StrideNet, multiscale, normalise
from segkit.errors import ConfigError
from segkit.evaluation.loop import evaluate
from segkit.evaluation.metrics import ConfusionMatrix
from segkit.inference.multiscale import predict_image, predict_single, probabilities, resolve_max_batch
from segkit.inference.options import InferenceOptions
from segkit.inference.prepare import prepare_model


@torch.inference_mode()
def test_predict_single_pads_to_output_stride_and_crops_back():
    model = StrideNet(5).eval()
    image = torch.randn(2, 3, 37, 50)
    logits = predict_single(model, image)
    torch.testing.assert_close(logits, model.conv(image))
    labels = predict_single(model, image[0], argmax=True)
    assert labels.shape == (37, 50)
    assert torch.equal(labels, model.conv(image[:1]).argmax(1)[0])


@pytest.mark.parametrize("crop", [64, 24], ids=["whole", "sliding"])
@torch.inference_mode()
def test_native_scale_with_flip_is_twice_the_softmax(crop):
    # At scale 1 of the image's own size a per-pixel network gives the same probabilities in
    # every window and in the mirrored copy, so the sum is exactly 2 x softmax.
    model = PixelNet(4).eval()
    image = torch.randn(3, 40, 56)
    probs = multiscale(model, image, [1.0], True, 56, crop, 4)
    torch.testing.assert_close(probs, 2 * model.conv(image[None]).softmax(1)[0])


@torch.inference_mode()
def test_multiscale_flip_recovers_blocky_label_map():
    num_classes, block = 3, 12
    labels = torch.randint(0, num_classes, (4, 6), generator=torch.Generator().manual_seed(0))
    labels = labels.repeat_interleave(block, 0).repeat_interleave(block, 1)  # 48 x 72
    model = PixelNet(num_classes).eval()
    with torch.no_grad():
        model.conv.weight.copy_(10 * torch.eye(3).view(3, 3, 1, 1))
        model.conv.bias.zero_()
    image = F.one_hot(labels, num_classes).permute(2, 0, 1).float()
    probs = multiscale(model, image, [0.5, 0.75, 1.0, 1.5], True, 64, 40, num_classes,
                               max_batch=5)
    assert probs.shape == (num_classes, 48, 72)
    torch.testing.assert_close(probs.sum(0), torch.full((48, 72), 8.0))
    # Away from block edges every scale sees a pure colour, whatever the resizing.
    inner = torch.zeros(block, dtype=torch.bool)
    inner[3:-3] = True
    keep = inner.repeat(4)[:, None] & inner.repeat(6)[None, :]
    assert torch.equal(probs.argmax(0)[keep], labels[keep])
    labels_out = multiscale(model, image, [0.5, 1.0], False, 64, 40, num_classes,
                                    argmax=True)
    assert torch.equal(labels_out[keep], labels[keep])


@torch.inference_mode()
def test_sliding_window_equals_whole_image_away_from_window_borders():
    model = ConvNet(4).eval()
    image = torch.randn(3, 40, 56)
    whole = multiscale(model, image, [1.0], False, 56, 64, 4)
    # Padding the bottom/right to the crop differs from the net's own zero padding only within
    # its 2-pixel reach of the border (the hidden layer is not zero there).
    direct = model(image[None])["out"].softmax(1)[0]
    torch.testing.assert_close(whole[:, :-2, :-2], direct[:, :-2, :-2])
    sliding = multiscale(model, image, [1.0], False, 56, 24, 4)
    # crop 24, stride 16: rows start at 0, 16 and columns at 0, 16, 32, so window edges inside
    # the image lie at rows 16, 24 and columns 16..40; keep 2 pixels away from them and from the
    # bottom/right border.
    rows = torch.ones(40, dtype=torch.bool)
    rows[14:26] = rows[-2:] = False
    cols = torch.ones(56, dtype=torch.bool)
    cols[14:42] = cols[-2:] = False
    clean = rows[:, None] & cols[None, :]
    torch.testing.assert_close(sliding[:, clean], whole[:, clean])
    assert (sliding - whole).abs().amax() > 1e-3  # windows really were used


@pytest.mark.parametrize("size", [(45, 61), (61, 45)], ids=["landscape", "portrait"])
@torch.inference_mode()
def test_batched_multiscale_flip_equals_naive_loop(size):
    model = ConvNet(5).eval()
    image = torch.randn(3, *size)
    # base 48, crop 32: scale 0.5 fits the crop, the others slide (0.75 also pads its short side).
    args = ([0.5, 0.75, 1.0, 1.25], True, 48, 32, 5)
    expected = naive_multiscale(model, image, *args)
    torch.testing.assert_close(multiscale(model, image, *args, max_batch=3), expected)
    torch.testing.assert_close(multiscale(model, image, *args, max_batch=64), expected)


@torch.inference_mode()
def test_autocast_bf16_on_cpu_is_close():
    model = ConvNet(4).eval()
    image = torch.randn(3, 30, 40)
    args = ([0.75, 1.0], True, 40, 32, 4)
    ref = multiscale(model, image, *args)
    low = multiscale(model, image, *args, amp="bf16")
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, ref, atol=0.05, rtol=0)
    with pytest.raises(ConfigError, match="'fp8'"):
        multiscale(model, image, *args, amp="fp8")


def _calibrated_segmentor():
    """A small recipe model whose BatchNorm statistics were gathered on the kind of input it sees,
    so that eval-mode activations are of the trained scale (random running statistics are not)."""
    from segkit.models.resnest import create_backbone
    from segkit.models.segmentor import Segmentor
    torch.manual_seed(0)
    model = Segmentor(create_backbone("resnest14", output_stride=8), 7, channels=16)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the calibration batches
    with torch.no_grad():
        for _ in range(4):
            model.train()(torch.randn(4, 3, 64, 64))
    return model.eval()


@pytest.mark.parametrize("how", ["autocast", "dtype"])
@torch.inference_mode()
def test_bf16_agrees_with_fp32(how):
    # bf16 keeps 8 bits of mantissa: probabilities move by a few hundredths and only pixels whose
    # two best classes are that close can change their label.
    model = _calibrated_segmentor()
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    reference = predict_single(prepare_model(copy.deepcopy(model), "cpu"), images).softmax(1)
    bf16 = (prepare_model(copy.deepcopy(model), "cpu", InferenceOptions(dtype="bf16")) if how == "dtype"
            else prepare_model(copy.deepcopy(model), "cpu"))
    logits = predict_single(bf16, images, amp="bf16" if how == "autocast" else None)
    assert logits.dtype == torch.float32
    probs = logits.softmax(1)
    assert (probs - reference).abs().max() < 0.08
    top2 = reference.topk(2, dim=1).values
    confident = top2[:, 0] - top2[:, 1] > 0.1
    agree = probs.argmax(1) == reference.argmax(1)
    assert agree[confident].all() and confident.float().mean() > 0.3
    assert agree.float().mean() > 0.9
    # Multi-scale + flip goes through the same forward.
    args = (images[0], [0.75, 1.0], True, 64, 48, 7)
    ms_reference = multiscale(prepare_model(copy.deepcopy(model), "cpu"), *args)
    ms = multiscale(bf16, *args, amp="bf16" if how == "autocast" else None)
    assert (ms.argmax(0) == ms_reference.argmax(0)).float().mean() > 0.9


class _NCHWLogits(nn.Module):
    """A model's logits copied to NCHW: the layout float32 models return."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.model(x)["out"].contiguous()}


@pytest.mark.parametrize("options", [InferenceOptions(flip=True),
                                     InferenceOptions(scales=(0.75, 1.0), flip=True),
                                     InferenceOptions(scales=(0.75, 1.0), flip=True, fusion="original")])
@torch.inference_mode()
def test_bf16_scores_keep_the_classes_innermost(options):
    # A CPU bf16 model returns its logits with the classes innermost (resized in channels_last); the
    # softmax, the window accumulation, the resizes and the scale sum keep that layout and compute
    # what they compute on NCHW logits, up to float rounding. float32 keeps NCHW.
    model = _calibrated_segmentor()
    image = torch.randn(3, 64, 80, generator=torch.Generator().manual_seed(3))
    geometry = dict(base_size=64, crop_size=48, num_classes=7)
    bf16_model = prepare_model(copy.deepcopy(model), "cpu", InferenceOptions(dtype="bf16"))
    bf16 = predict_image(bf16_model, image, options, **geometry)
    nchw = predict_image(_NCHWLogits(bf16_model), image, options, **geometry)
    fp32 = predict_image(prepare_model(copy.deepcopy(model), "cpu"), image, options, **geometry)
    assert bf16.stride(0) == 1 and nchw.is_contiguous() and fp32.is_contiguous()
    assert bf16.shape == fp32.shape == (7, 64, 80)
    torch.testing.assert_close(bf16, nchw, rtol=1e-5, atol=1e-5)
    probs = probabilities(bf16, options)
    torch.testing.assert_close(probs.sum(0), torch.ones(64, 80))
    assert (probs.argmax(0) == fp32.argmax(0)).float().mean() > 0.9


@torch.inference_mode()
def test_bf16_weights_are_cast_once_and_compute_what_autocast_computes():
    model = _calibrated_segmentor()
    weights = prepare_model(copy.deepcopy(model), "cpu", InferenceOptions(dtype="bf16"))
    assert {p.dtype for p in weights.parameters()} == {torch.bfloat16}
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    # On CPU autocast runs every layer of this model in bf16 too, from the same folded weights cast
    # to bf16: the two give the same logits; prepared weights skip the per-call casts.
    autocast = predict_single(prepare_model(copy.deepcopy(model), "cpu"), images, amp="bf16")
    torch.testing.assert_close(predict_single(weights, images), autocast, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="model dtype must be one of .* got 'fp8'"):
        prepare_model(copy.deepcopy(model), "cpu", InferenceOptions(dtype="fp8"))


def test_evaluate_single_scale_matches_direct_scoring():
    ds = FakeDataset([(20, 30), (33, 17), (24, 24), (9, 40)], unlabelled={2})
    model = PixelNet(ds.num_classes).train()
    seen = []
    res = evaluate(model, ds, num_workers=0, progress=False,
                   callback=lambda i, img, mask, pred: seen.append((i, mask is None, pred.shape)))
    assert model.training  # restored
    assert seen == [(i, i == 2, ds.images[i].shape[:2]) for i in range(4)]
    expected = ConfusionMatrix(ds.num_classes)
    with torch.inference_mode():
        for image, mask in zip(ds.images, ds.masks):
            if mask is not None:
                pred = model.eval()(normalise(image)[None])["out"].argmax(1)[0]
                expected.update(pred, torch.from_numpy(mask))
    assert res == {**expected.compute(), "num_images": 4, "seconds": res["seconds"]}


def test_evaluate_single_scale_with_flip_averages_the_mirror():
    ds = FakeDataset([(20, 30), (9, 40)])
    model = ConvNet(ds.num_classes).eval()
    res = evaluate(model, ds, InferenceOptions(flip=True), pad_multiple=1, num_workers=0, progress=False)
    expected = ConfusionMatrix(ds.num_classes)
    with torch.inference_mode():
        for image, mask in zip(ds.images, ds.masks):
            x = normalise(image)[None]
            probs = model(x)["out"].softmax(1) + model(x.flip(-1))["out"].softmax(1).flip(-1)
            expected.update(probs.argmax(1)[0], torch.from_numpy(mask))
    assert res["mIoU"] == expected.compute()["mIoU"] and res["pixAcc"] == expected.compute()["pixAcc"]
    plain = evaluate(model, ds, pad_multiple=1, num_workers=0, progress=False)
    assert plain["pixAcc"] != res["pixAcc"]  # the mirror changed predictions: flip was applied


def test_evaluate_multiscale_with_loader_workers():
    ds = FakeDataset([(20, 30), (33, 17), (24, 24)])
    model = ConvNet(ds.num_classes)
    res = evaluate(model, ds, InferenceOptions(scales=[0.75, 1.0], flip=True), base_size=32, crop_size=24,
                   convention="all", num_workers=1, progress=False)
    expected = ConfusionMatrix(ds.num_classes)
    with torch.inference_mode():
        for image, mask in zip(ds.images, ds.masks):
            probs = naive_multiscale(model.eval(), normalise(image), [0.75, 1.0], True, 32, 24,
                                     ds.num_classes, pad=[-m / s for m, s in zip(MEAN, STD)])
            expected.update(probs.argmax(0), torch.from_numpy(mask))
    assert torch.equal(torch.tensor(res["IoU"]).nan_to_num(-1),
                       torch.tensor(expected.compute()["IoU"]).nan_to_num(-1))
    assert res["convention"] == "all" and res["mIoU"] == res["mIoU_all"]


def test_evaluate_rejects_bad_config_before_running():
    ds = FakeDataset([(8, 8)])
    with pytest.raises(ConfigError, match="base_size and crop_size"):
        evaluate(PixelNet(4), ds, InferenceOptions(scales=[1.0]), crop_size=8, num_workers=0)
    with pytest.raises(ConfigError, match="'mean'"):
        evaluate(PixelNet(4), ds, convention="mean", num_workers=0)
    with pytest.raises(ConfigError, match="max_batch.*'eight'"):
        InferenceOptions(scales=[1.0], max_batch="eight")
    with pytest.raises(ConfigError, match="max_batch.*got 0"):  # unused without scales, still checked
        InferenceOptions(max_batch=0)


@pytest.mark.parametrize("max_batch,crop,device,expected", [
    ("auto", 480, "cpu", 2), ("auto", 120, "cpu", 8), ("auto", 769, "cpu", 1), ("auto", 300, "cpu", 5),
    ("auto", 480, "cuda", 8), (3, 480, "cpu", 3)])
def test_max_batch_auto_fits_a_pixel_budget_on_cpu(max_batch, crop, device, expected):
    assert resolve_max_batch(max_batch, crop, device) == expected


@pytest.mark.parametrize("bad", [0, -2, 2.5, True, "big"])
def test_max_batch_must_be_positive_integer_or_auto(bad):
    with pytest.raises(ConfigError, match=f"got {bad!r}"):
        resolve_max_batch(bad, 480, "cpu")
