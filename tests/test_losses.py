"""SegmentationLoss: cross-entropy with ignored pixels, the auxiliary term, smp's extra losses, class
weights (given or computed from the masks) and OHEM."""
import json
import math
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from bench.memory import saved_bytes
from loss_helpers import OHEM, ddp_batch, loss_and_grads, ohem_worker

from segkit.data import FolderDataset
from segkit.errors import ConfigError
from segkit.training.losses import (
    Ohem,
    SegmentationLoss,
    auto_class_weights,
    balance_weights,
    build_loss,
    class_frequencies,
    load_class_weights,
    ohem_mask,
    pixel_cross_entropy,
    save_class_weights,
)


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


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16-autocast"])
def test_pixel_cross_entropy_is_torch_cross_entropy(amp):
    torch.manual_seed(0)
    low = torch.randn(2, 6, 5, 7, requires_grad=True)
    target = torch.randint(0, 6, (2, 20, 28))
    target[1, :4] = 255
    results = []
    for loss_fn in (lambda x: pixel_cross_entropy(x, target),
                    lambda x: F.cross_entropy(x, target, ignore_index=255, reduction="none")):
        low.grad = None
        with torch.autocast("cpu", torch.bfloat16, enabled=amp):
            # bf16 logits under autocast, as the model's upsampled output is
            logits = F.interpolate(low, size=(20, 28), mode="bilinear", align_corners=True)
            nll = loss_fn(logits)
        (nll * torch.linspace(0, 1, nll.numel()).view_as(nll)).sum().backward()
        results.append((nll, low.grad.clone()))
    (ours, our_grad), (torchs, torch_grad) = results
    assert ours.dtype == torch.float32 and torch.equal(ours[1, :4], torch.zeros(4, 28))
    # The same float32 arithmetic on the same logits; gradients reach bf16 logits rounded to bf16.
    torch.testing.assert_close(ours, torchs)
    torch.testing.assert_close(our_grad, torch_grad, **({"rtol": 1e-2, "atol": 1e-3} if amp else {}))


@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16-autocast"])
def test_pixel_cross_entropy_upsamples_smaller_logits_itself(amp, align_corners):
    torch.manual_seed(0)
    low = torch.randn(2, 6, 5, 7, requires_grad=True)
    target = torch.randint(0, 6, (2, 37, 51))
    target[1, :4] = 255
    weights = torch.linspace(0, 1, target.numel()).view_as(target)
    results = []
    for upsample_first in (False, True):
        low.grad = None
        with torch.autocast("cpu", torch.bfloat16, enabled=amp):
            logits = low.to(torch.bfloat16) if amp else low  # the model's logits: bf16 under autocast
            if upsample_first:  # bf16 logits: resized in float32 (on CPU, inside: as matrix products)
                logits = F.interpolate(logits.float() if amp else logits, size=(37, 51), mode="bilinear",
                                       align_corners=align_corners)
            nll = pixel_cross_entropy(logits, target, align_corners=align_corners)
        (nll * weights).sum().backward()
        results.append((nll, low.grad.clone()))
    (inside, inside_grad), (outside, outside_grad) = results
    if amp:  # the same values up to float32 rounding
        torch.testing.assert_close(inside, outside, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(inside_grad, outside_grad, rtol=1e-5, atol=1e-6)
    else:  # the same kernels on the same values in the same order: bitwise equal, loss and gradients
        assert torch.equal(inside, outside) and torch.equal(inside_grad, outside_grad)
    assert torch.equal(inside[1, :4], torch.zeros(4, 51))


def test_build_loss_upsamples_with_the_models_align_corners():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5, 7)
    target = torch.randint(0, 4, (2, 37, 51))
    for align_corners in (True, False):
        built = build_loss({"aux_weight": 0.2}, align_corners=align_corners)
        expected = F.cross_entropy(F.interpolate(logits, size=(37, 51), mode="bilinear",
                                                 align_corners=align_corners), target)
        torch.testing.assert_close(built(logits, target)[0], expected)


def test_pixel_cross_entropy_keeps_small_logits_small():
    logits = torch.randn(2, 150, 8, 8, requires_grad=True)
    target = torch.randint(0, 150, (2, 64, 64))
    kept = saved_bytes(lambda: pixel_cross_entropy(logits, target), [])
    # The 8x8 logits, a float32 log-sum-exp and the int64 target per full-resolution pixel: no
    # 150-class map at 64x64 (that alone would be 2 x 150 x 64 x 64 x 4 bytes).
    assert kept.total == 2 * 150 * 8 * 8 * 4 + 2 * 64 * 64 * (4 + 8)


def test_pixel_cross_entropy_keeps_the_logits_as_they_came():
    logits = torch.randn(2, 150, 32, 32, dtype=torch.bfloat16, requires_grad=True)
    target = torch.randint(0, 150, (2, 32, 32))
    ours = saved_bytes(lambda: pixel_cross_entropy(logits, target), [])
    torchs = saved_bytes(lambda: F.cross_entropy(logits.float(), target, reduction="none"), [])
    # bf16 logits + a float32 log-sum-exp and the int64 target per pixel, where torch keeps the
    # float32 log-probabilities (and the target).
    pixels = 2 * 32 * 32
    assert ours.total == pixels * (150 * 2 + 4 + 8)
    assert torchs.total >= pixels * (150 * 4 + 8)


# --- class weights ---------------------------------------------------------------------------------

LN2, LN3, LN4 = math.log(2), math.log(3), math.log(4)


def _three_pixels():
    """1x3x1x4 logits whose true-class NLLs are ln 3, ln 4, ln 2 and an ignored fourth pixel."""
    logits = torch.tensor([[[[0.0, LN2, 0.0, 5.0]],     # class 0 scores
                            [[0.0, 0.0, 0.0, -1.0]],    # class 1
                            [[0.0, 0.0, LN2, 2.0]]]],   # class 2
                          requires_grad=True)
    # pixel 0: softmax (1/3, 1/3, 1/3), y=0 -> ln 3; pixel 1: (2/4, 1/4, 1/4), y=1 -> ln 4;
    # pixel 2: (1/4, 1/4, 2/4), y=2 -> ln 2; pixel 3: ignored.
    target = torch.tensor([[[0, 1, 2, 255]]])
    return logits, target


def test_weighted_cross_entropy_is_the_weighted_mean_by_hand():
    logits, target = _three_pixels()
    loss = SegmentationLoss(class_weights=[1.0, 2.0, 0.5], aux_weight=0.4)
    total, parts = loss({"out": logits, "aux": logits}, target)
    expected = (1.0 * LN3 + 2.0 * LN4 + 0.5 * LN2) / (1.0 + 2.0 + 0.5)
    assert parts["ce"].item() == pytest.approx(expected, rel=1e-6)
    assert parts["aux"].item() == pytest.approx(expected, rel=1e-6)  # the aux head is weighted too
    assert total.item() == pytest.approx(1.4 * expected, rel=1e-6)
    # Unweighted: the plain mean of the same three pixels.
    assert SegmentationLoss()(logits, target)[0].item() == pytest.approx((LN3 + LN4 + LN2) / 3, rel=1e-6)
    # torch's weighted mean agrees (an independent check of the same definition).
    torch.testing.assert_close(parts["ce"], F.cross_entropy(logits, target, weight=torch.tensor([1.0, 2.0, 0.5]),
                                                            ignore_index=255))
    total.backward()
    assert torch.equal(logits.grad[..., 3], torch.zeros(1, 3, 1))  # the ignored pixel


def test_weighted_cross_entropy_without_weight_in_the_batch_is_zero():
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    for target, weights in [(torch.full((2, 4, 4), 255), [1.0, 1.0, 1.0]),  # all ignored
                            (torch.zeros(2, 4, 4, dtype=torch.long), [0.0, 1.0, 1.0])]:  # weight 0 only
        total, _ = SegmentationLoss(class_weights=weights)({"out": logits, "aux": logits * 2}, target)
        assert total.item() == 0
        total.backward()
        assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_class_weights_are_checked():
    logits, target = _three_pixels()
    with pytest.raises(ValueError, match="class_weights has 2 entries but the logits have 3 classes"):
        SegmentationLoss(class_weights=[1.0, 2.0])(logits, target)
    with pytest.raises(ConfigError, match="class_weights has 2 entries but there are 3 classes"):
        build_loss({"class_weights": [1.0, 2.0]}, num_classes=3)
    for bad in ([], [1.0, -1.0], [0.0, 0.0], [1.0, float("nan")], "heavy", 3.0):
        with pytest.raises(ValueError, match="class_weights"):
            build_loss({"class_weights": bad})
    with pytest.raises(ValueError, match=r"class_weights=auto needs .*auto_weights="):
        build_loss({"class_weights": "auto", "balance": "median_frequency"})
    with pytest.raises(ValueError, match="unknown balance method 'median'"):
        build_loss({"balance": "median"})
    loss = build_loss({"class_weights": "auto", "balance": "inverse_log"}, auto_weights=[1.0, 2.0, 0.5])
    assert loss.class_weights.tolist() == [1.0, 2.0, 0.5]


def _write_known_masks(root):
    """3 masks 4x4 over 4 classes (class 3 never occurs), 255 = ignore:
    A: 8 x class 0, 4 x class 1, 4 ignored (12 labelled); B: 10 x class 0, 6 x class 2 (16);
    C: 2 x class 1, 12 x class 2, 2 ignored (14)."""
    from data_helpers import random_image, save

    masks = {"a": [0] * 8 + [1] * 4 + [255] * 4, "b": [0] * 10 + [2] * 6, "c": [1] * 2 + [2] * 12 + [255] * 2}
    rng = np.random.default_rng(0)
    for name, values in masks.items():
        save(root / "images/train" / f"{name}.png", random_image(rng, 4, 4))
        save(root / "masks/train" / f"{name}.png", rng.permutation(np.array(values, np.uint8)).reshape(4, 4))
    (root / "classes.yaml").write_text("classes: [c0, c1, c2, c3]\n")
    return FolderDataset(root, "train")


def test_class_frequencies_and_balance_weights_by_hand(tmp_path):
    ds = _write_known_masks(tmp_path)
    counts = class_frequencies(ds)
    assert counts.pixels.tolist() == [18, 6, 18, 0]
    assert counts.image_pixels.tolist() == [12 + 16, 12 + 14, 16 + 14, 0]
    assert counts.images.tolist() == [2, 2, 2, 0] and counts.num_images == 3
    assert class_frequencies(ds, num_workers=2) == counts  # read in DataLoader workers

    # Median frequency: freq = 18/28, 6/26, 18/30; median 18/30 = 0.6; absent class 3 -> 1.
    with pytest.warns(UserWarning, match=r"classes \[3\] never occur"):
        median = balance_weights(counts, "median_frequency")
    assert median.tolist() == pytest.approx([0.6 / (18 / 28), 0.6 / (6 / 26), 1.0, 1.0], rel=1e-12)
    assert median.tolist() == pytest.approx([14 / 15, 2.6, 1.0, 1.0], rel=1e-12)

    # Inverse log (ENet): p = 18/42, 6/42, 18/42, 0; w = 1 / ln(1.02 + p).
    with pytest.warns(UserWarning):
        inv = balance_weights(counts, "inverse_log")
    expected = [1 / math.log(1.02 + 3 / 7), 1 / math.log(1.02 + 1 / 7), 1 / math.log(1.02 + 3 / 7),
                1 / math.log(1.02)]
    assert inv.tolist() == pytest.approx(expected, rel=1e-12)
    assert expected[3] == pytest.approx(50.4983, rel=1e-5)
    with pytest.raises(ValueError, match="unknown balance method 'tf-idf'"):
        balance_weights(counts, "tf-idf")


def test_class_weights_json_cache(tmp_path):
    ds = _write_known_masks(tmp_path / "data")
    cache = tmp_path / "run" / "class_weights.json"
    with pytest.warns(UserWarning):
        weights = auto_class_weights(ds, "median_frequency", cache=cache)
    assert weights == pytest.approx([14 / 15, 2.6, 1.0, 1.0], rel=1e-12)
    record = json.loads(cache.read_text())
    assert record["method"] == "median_frequency" and record["classes"] == ["c0", "c1", "c2", "c3"]
    assert record["frequencies"]["pixels"] == [18, 6, 18, 0]
    assert not list(cache.parent.glob(".*"))  # no temp file left behind
    # Computed once: with the masks gone, the cache still answers, exactly.
    for mask in (tmp_path / "data/masks/train").iterdir():
        mask.unlink()
    assert auto_class_weights(ds, "median_frequency", cache=cache) == weights
    assert load_class_weights(cache, num_classes=4, method="median_frequency") == weights
    with pytest.raises(ValueError, match=r"class_weights.json: weights were computed with 'median_frequency', "
                                         r"not 'inverse_log'; delete it"):
        auto_class_weights(ds, "inverse_log", cache=cache)
    with pytest.raises(ValueError, match="class_weights has 4 entries but there are 5 classes"):
        load_class_weights(cache, num_classes=5)
    save_class_weights(tmp_path / "w.json", [0.5, 2.0])
    assert load_class_weights(tmp_path / "w.json") == [0.5, 2.0]
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a class weights file"):
        load_class_weights(tmp_path / "bad.json")


# --- OHEM ------------------------------------------------------------------------------------------

# True-class probabilities of 8 valid pixels and 2 ignored ones (which would be the hardest).
PROBS = [0.6, 0.1, 0.95, 0.3, 0.8, 0.2, 0.9, 0.5, 0.05, 0.01]
LABELS = [0, 1, 0, 1, 1, 0, 0, 1, 255, 255]


def _known_probabilities():
    """1x2x1x10 logits whose softmax gives each pixel's true class exactly PROBS (2 classes)."""
    scores = []
    for p, y in zip(PROBS, LABELS):
        true, other = math.log(p), math.log(1 - p)
        scores.append([true, other] if y in (0, 255) else [other, true])
    logits = torch.tensor(scores, dtype=torch.float64).T.reshape(1, 2, 1, 10).float().requires_grad_()
    return logits, torch.tensor(LABELS).reshape(1, 1, 10)


@pytest.mark.parametrize("thresh, min_kept, kept", [
    (0.7, 3, [0.6, 0.1, 0.3, 0.2, 0.5]),                      # 5 pixels below 0.7 >= min_kept
    (0.25, 4, [0.1, 0.3, 0.2, 0.5]),                           # 2 below 0.25 < 4: the 4 hardest
    (0.25, 100, [0.6, 0.1, 0.95, 0.3, 0.8, 0.2, 0.9, 0.5]),   # min_kept > 8 valid: all valid pixels
    (1.0, 1, [0.6, 0.1, 0.95, 0.3, 0.8, 0.2, 0.9, 0.5]),      # thresh 1 keeps every valid pixel
    (0.05, 1, [0.1]),                                          # the ignored 0.05 / 0.01 never count
])
@pytest.mark.parametrize("weights", [None, [1.0, 3.0]])
def test_ohem_keeps_the_pixels_of_the_definition(thresh, min_kept, kept, weights):
    logits, target = _known_probabilities()
    mask = ohem_mask(logits, target, thresh, min_kept)
    assert [p for p, m in zip(PROBS, mask.flatten().tolist()) if m] == kept

    w = {0: 1.0, 1: 1.0} if weights is None else {0: weights[0], 1: weights[1]}
    chosen = [(p, w[y]) for p, y in zip(PROBS, LABELS) if p in kept]
    expected = sum(-wy * math.log(p) for p, wy in chosen) / sum(wy for _, wy in chosen)
    loss = SegmentationLoss(class_weights=weights, ohem={"thresh": thresh, "min_kept": min_kept})
    total, parts = loss(logits, target)
    assert parts["ce"].item() == pytest.approx(expected, rel=1e-5)
    total.backward()
    has_grad = logits.grad.abs().sum(dim=1).flatten() > 0
    assert torch.equal(has_grad, mask.flatten())  # only the kept pixels are trained


def test_ohem_applies_to_the_main_head_only():
    logits, target = _known_probabilities()
    aux = logits.detach() * 0.5
    loss = SegmentationLoss(aux_weight=0.4, class_weights=[1.0, 3.0], ohem={"thresh": 0.7, "min_kept": 3})
    total, parts = loss({"out": logits, "aux": aux}, target)
    torch.testing.assert_close(parts["aux"], F.cross_entropy(aux, target, weight=torch.tensor([1.0, 3.0]),
                                                             ignore_index=255))
    torch.testing.assert_close(total, parts["ce"] + 0.4 * parts["aux"])
    # All ignored: 0 with zero gradients, as the plain loss.
    total, _ = loss({"out": logits, "aux": aux}, torch.full_like(target, 255))
    total.backward()
    assert total.item() == 0 and torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("ohem, match", [
    ({"thresh": 0.0}, r"ohem.thresh must be a probability in \(0, 1\], got 0.0"),
    ({"thresh": 1.5}, "ohem.thresh"),
    ({"thresh": "high"}, "ohem.thresh"),
    ({"min_kept": 0}, "ohem.min_kept must be an integer >= 1, got 0"),
    ({"min_kept": 2.5}, "ohem.min_kept"),
    ({"threshold": 0.7}, r"unknown ohem option\(s\) \['threshold'\]"),
    (0.7, "ohem must be null or a mapping"),
])
def test_bad_ohem_options(ohem, match):
    with pytest.raises(ValueError, match=match) as err:
        build_loss({"ohem": ohem})
    assert isinstance(err.value, ConfigError)
    assert build_loss({"ohem": {}}).ohem == Ohem(thresh=0.7, min_kept=100_000)


def test_ohem_under_two_gloo_ranks_selects_per_rank(tmp_path):
    model, x, target = ddp_batch()
    halves = [loss_and_grads(model, x[h], target[h]) for h in (slice(0, 2), slice(2, 4))]
    full_keep = ohem_mask(model(x), target, **OHEM)
    half_keep = torch.cat([ohem_mask(model(x[h]), target[h], **OHEM) for h in (slice(0, 2), slice(2, 4))])
    assert not torch.equal(full_keep, half_keep)  # per-rank selection differs from whole-batch selection

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Spawned, not forked: a fork of a process whose thread pools already run (earlier tests) is unsafe.
    mp.start_processes(ohem_worker, args=(2, port, tmp_path), nprocs=2, join=True, start_method="spawn")
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(result["loss"], halves[rank][0])
        for ddp_grad, g0, g1 in zip(result["grads"], halves[0][1], halves[1][1]):
            torch.testing.assert_close(ddp_grad, (g0 + g1) / 2)
