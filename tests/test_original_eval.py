"""predict_multiscale's options for the original PyTorch-Encoding evaluation (``MultiEvalModule``).

``original_multiscale`` below is a plain re-implementation of the original algorithm written from
its description (docs: REFERENCE.md, "Evaluation (original code)"): per scale, per window, per
flip, one forward at a time, scores ``exp(l + l_flipped)`` in a numpy dtype of our choosing
(float64, or extended precision where even float64 would overflow) and its own bilinear
``align_corners=True`` resize of the score maps. segkit's batched, log-space implementation must
give the same argmax everywhere and the same scores up to rounding, on a real ResNeSt + DeepLabV3
with random weights and calibrated BatchNorm statistics.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bench.naive import naive_multiscale
from eval_helpers import MEAN, STD, ConvNet, FakeDataset, multiscale, normalise
from segkit.evaluation.loop import evaluate
from segkit.evaluation.metrics import ConfusionMatrix
from segkit.inference.multiscale import _log_resize
from segkit.inference.options import InferenceOptions
from segkit.models.resnest import create_backbone
from segkit.models.segmentor import Segmentor

NUM_CLASSES = 5
PAD = [-m / s for m, s in zip(MEAN, STD)]  # a black pixel, normalised


@pytest.fixture(scope="module")
def model():
    """resnest14 + DeepLabV3 (16 head channels), random weights, BatchNorm statistics measured
    on random images (cumulative average: momentum None), in eval mode."""
    torch.manual_seed(0)
    net = Segmentor(create_backbone("resnest14", output_stride=8), NUM_CLASSES, aux=False, channels=16)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None
            m.reset_running_stats()
    gen = torch.Generator().manual_seed(1)
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(4, 3, 24, 24, generator=gen))
    return net.eval()


class Scaled(nn.Module):
    """``model`` with its logits multiplied by ``factor``: a very confident network."""

    def __init__(self, model: nn.Module, factor: float) -> None:
        super().__init__()
        self.model, self.factor = model, factor

    def forward(self, x):
        return {"out": self.model(x)["out"] * self.factor}


def _pad_to_crop(img: torch.Tensor, crop: int) -> torch.Tensor:
    """The original's pad_image: bottom/right, each side up to ``crop``, with black per channel."""
    _, _, h, w = img.shape
    out = torch.tensor(PAD).view(1, 3, 1, 1).repeat(1, 1, max(h, crop), max(w, crop))
    out[:, :, :h, :w] = img
    return out


def _resize_align_corners(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of C x h x w with align_corners=True, one axis after the other."""
    for axis, size in ((1, height), (2, width)):
        n = x.shape[axis]
        src = np.arange(size) * ((n - 1) / (size - 1) if size > 1 else 0.0)
        i0 = np.floor(src).astype(np.int64)
        i1 = np.minimum(i0 + 1, n - 1)
        lam = (src - i0).astype(x.dtype)
        shape = [1, 1, 1]
        shape[axis] = size
        x = np.take(x, i0, axis) * (1 - lam).reshape(shape) + np.take(x, i1, axis) * lam.reshape(shape)
    return x


@torch.inference_mode()
def original_multiscale(model, image, scales, flip, base_size, crop, num_classes, dtype=np.float64):
    """The original algorithm, C x H x W summed scores in ``dtype`` (the network runs in float32)."""
    _, h, w = image.shape
    stride = int(crop * 2 / 3)

    def infer(img):  # module_inference: exp(l + flip(l of the flipped image))
        logits = model(img)["out"][0].numpy().astype(dtype)
        if flip:
            logits = logits + model(img.flip(-1))["out"][0].flip(-1).numpy().astype(dtype)
        with np.errstate(over="ignore"):
            return np.exp(logits)

    scores = np.zeros((num_classes, h, w), dtype)
    for scale in scales:
        long_size = math.ceil(base_size * scale)
        if h > w:
            height, width = long_size, int(1.0 * w * long_size / h + 0.5)
        else:
            height, width = int(1.0 * h * long_size / w + 0.5), long_size
        cur = F.interpolate(image[None], (height, width), mode="bilinear", align_corners=True)
        if long_size <= crop:
            outputs = infer(_pad_to_crop(cur, crop))[:, :height, :width]
        else:
            pad_img = _pad_to_crop(cur, crop)
            ph, pw = pad_img.shape[-2:]
            outputs = np.zeros((num_classes, ph, pw), dtype)
            count = np.zeros((ph, pw), dtype)
            for idh in range(math.ceil((ph - crop) / stride) + 1):
                for idw in range(math.ceil((pw - crop) / stride) + 1):
                    h0, w0 = idh * stride, idw * stride
                    h1, w1 = min(h0 + crop, ph), min(w0 + crop, pw)
                    out = infer(_pad_to_crop(pad_img[:, :, h0:h1, w0:w1], crop))
                    outputs[:, h0:h1, w0:w1] += out[:, :h1 - h0, :w1 - w0]
                    count[h0:h1, w0:w1] += 1
            assert (count > 0).all()
            outputs = (outputs / count)[:, :height, :width]
        scores += _resize_align_corners(outputs, h, w)
    return scores


def _ours(model, image, scales, flip, base, crop, **kwargs):
    return multiscale(model, image, scales, flip, base, crop, NUM_CLASSES, pad_value=PAD,
                      fusion="original", window_placement="original", align_corners=True, **kwargs)


# (image size, scales, flip, base size, crop): scales that fit the crop, that slide, that pad their
# short side; last windows that overhang the padded image (e.g. 28 px, crop 16: windows at 0, 10,
# 20, the last 8 px wide) and that end exactly at the border.
CASES = [
    ((20, 28), [0.5, 0.75, 1.0, 1.25], True, 28, 16),
    ((37, 23), [0.75, 1.0, 1.5], True, 32, 24),
    ((37, 23), [1.0, 1.75], False, 30, 16),
    ((23, 37), [0.5, 1.25, 2.0], True, 24, 16),
]


@pytest.mark.parametrize("size,scales,flip,base,crop", CASES)
def test_original_fusion_and_windows_match_the_reference(model, size, scales, flip, base, crop):
    image = torch.randn(3, *size, generator=torch.Generator().manual_seed(sum(size)))
    ref = original_multiscale(model, image, scales, flip, base, crop, NUM_CLASSES)
    assert np.isfinite(ref).all()
    ref_log = torch.from_numpy(np.log(ref / ref.sum(0)))
    for max_batch in (1, 5):
        ours = _ours(model, image, scales, flip, base, crop, max_batch=max_batch)
        assert ours.shape == (NUM_CLASSES, *size) and ours.dtype == torch.float32
        assert torch.equal(ours.argmax(0), torch.from_numpy(ref.argmax(0)))
        # Normalised over classes, scores and log scores agree up to rounding (a log score of
        # -38 is a float32 with an ulp of 4e-6: relative tolerance there).
        torch.testing.assert_close(ours.softmax(0).double(), ref_log.exp(), rtol=0, atol=1e-5)
        torch.testing.assert_close(ours.log_softmax(0).double(), ref_log, rtol=1e-5, atol=1e-5)
    labels = _ours(model, image, scales, flip, base, crop, argmax=True)
    assert torch.equal(labels, torch.from_numpy(ref.argmax(0)))


def test_original_windows_overhang_and_get_padded(model):
    # 16 x 28 at crop 16, stride 10: one row of windows; original columns at 0, 10, 20 (the last
    # one 8 px wide, padded to 16), border columns at 0, 10, 12: the predictions must differ.
    image = torch.randn(3, 16, 28, generator=torch.Generator().manual_seed(3))
    args = (model, image, [1.0], False, 28, 16, NUM_CLASSES)
    original = multiscale(*args, pad_value=PAD, window_placement="original")
    border = multiscale(*args, pad_value=PAD, window_placement="border")
    assert (original - border).abs().amax() > 1e-3
    # The columns only the last border window reaches differently: 0..9 see the same windows.
    torch.testing.assert_close(original[:, :, :10], border[:, :, :10])


def test_original_fusion_does_not_overflow(model):
    # Logits x1000: exp(l + l_flipped) reaches e^6000 and beyond. float32 (the original's
    # arithmetic) overflows to inf; extended precision (exponent up to ~11356) still holds it.
    if np.finfo(np.longdouble).maxexp < 16384:
        pytest.skip("numpy's long double has no extended exponent range on this platform")
    confident = Scaled(model, 1000.0)
    image = torch.randn(3, 37, 23, generator=torch.Generator().manual_seed(5))
    args = (confident, image, [0.75, 1.0, 1.5], True, 32, 16, NUM_CLASSES)
    with np.errstate(invalid="ignore"):  # inf * 0 in the resize
        assert not np.isfinite(original_multiscale(*args, dtype=np.float32)).all()
    ref = original_multiscale(*args, dtype=np.longdouble)
    assert np.isfinite(ref).all() and (ref.max(0) > 0).all() and np.log(ref.max()) > 1000
    ours = _ours(*args[:6], max_batch=4)
    assert torch.isfinite(ours).all()
    assert torch.equal(ours.argmax(0), torch.from_numpy(ref.argmax(0)))
    # The log scores themselves, up to float32 rounding of values in the thousands.
    log_ref = torch.from_numpy(np.log(ref).astype(np.float64))
    torch.testing.assert_close(ours.double(), log_ref, rtol=1e-5, atol=1e-5 * log_ref.abs().max().item())


def test_softmax_border_without_align_corners_is_the_naive_loop():
    # The former behaviour, still available: bench/naive.py's one-window-at-a-time loop.
    model = ConvNet(NUM_CLASSES).eval()
    image = torch.randn(3, 37, 23, generator=torch.Generator().manual_seed(7))
    args = ([0.5, 0.75, 1.0, 1.25], True, 32, 24, NUM_CLASSES)
    expected = naive_multiscale(model, image, *args, pad=PAD, align_corners=False)
    got = multiscale(model, image, *args, pad_value=PAD, max_batch=3, align_corners=False,
                     fusion="softmax", window_placement="border")
    torch.testing.assert_close(got, expected)
    # ... and align_corners really changes the result (default True).
    assert (multiscale(model, image, *args, pad_value=PAD) - expected).abs().amax() > 1e-3


@pytest.mark.parametrize("align_corners", [True, False])
def test_log_resize_is_log_of_bilinear_resize(align_corners):
    x = torch.randn(3, 13, 17, generator=torch.Generator().manual_seed(0))
    for size in [(20, 31), (7, 9), (13, 40), (1, 5), (30, 1), (13, 17)]:
        expected = F.interpolate(x.exp()[None], size, mode="bilinear", align_corners=align_corners)[0].log()
        torch.testing.assert_close(_log_resize(x, size, align_corners), expected, rtol=0, atol=1e-6)
    huge = 1000 * x  # exp overflows float32; the log-space resize does not
    out = _log_resize(huge, (20, 31), align_corners)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, _log_resize(huge.double(), (20, 31), align_corners).float())


def test_evaluate_passes_the_options_through():
    ds = FakeDataset([(20, 30), (33, 17)])
    model = ConvNet(ds.num_classes).eval()
    options = dict(fusion="original", window_placement="original", align_corners=True)
    res = evaluate(model, ds, InferenceOptions(scales=[0.75, 1.0], flip=True, **options), base_size=32,
                   crop_size=24, num_workers=0, progress=False)
    expected = ConfusionMatrix(ds.num_classes)
    for image, mask in zip(ds.images, ds.masks):
        pred = multiscale(model, normalise(image), [0.75, 1.0], True, 32, 24, ds.num_classes,
                          pad_value=PAD, argmax=True, **options)
        expected.update(pred, torch.from_numpy(mask))
    assert res["IoU"] == pytest.approx(expected.compute()["IoU"], nan_ok=True)
    assert res["pixAcc"] == expected.compute()["pixAcc"]


@pytest.mark.parametrize("option,value", [("fusion", "mean"), ("fusion", "Original"),
                                          ("window_placement", "centre"), ("window_placement", None)])
def test_bad_option_values_are_rejected(option, value):
    # The options object refuses them when built, before any image is predicted.
    with pytest.raises(ValueError, match=f"{option} must be one of .* got {value!r}"):
        InferenceOptions(scales=[1.0], **{option: value})
