"""ConfusionMatrix against torchmetrics (present-class mIoU, pixAcc) and hand-computed values."""

import math

import pytest
import torch
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from segkit.errors import ConfigError, DataError
from segkit.evaluation.metrics import ConfusionMatrix, format_table

C = 6


def _oracle(batches):
    jaccard = MulticlassJaccardIndex(C, average="macro", ignore_index=255)
    per_class = MulticlassJaccardIndex(C, average="none", ignore_index=255)
    accuracy = MulticlassAccuracy(C, average="micro", ignore_index=255)
    for pred, target in batches:
        for metric in (jaccard, per_class, accuracy):
            metric.update(pred.flatten(), target.flatten().long())
    return jaccard.compute().item(), per_class.compute(), accuracy.compute().item()


def _ours(batches, convention="present"):
    cm = ConfusionMatrix(C)
    for pred, target in batches:
        cm.update(pred, target)
    return cm.compute(convention)


def _random_batches(seed):
    g = torch.Generator().manual_seed(seed)
    batches = []
    for shape in [(2, 17, 23), (31, 8), (1, 1, 40, 9), (50,)]:
        target = torch.randint(0, C, shape, generator=g, dtype=torch.uint8)
        target[torch.rand(shape, generator=g) < 0.2] = 255
        pred = torch.where(torch.rand(shape, generator=g) < 0.6, target.long() % C,
                           torch.randint(0, C, shape, generator=g))
        batches.append((pred, target))
    return batches


def _adversarial_batches():
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 3, (2, 16, 16), generator=g, dtype=torch.uint8)  # classes 3-5 absent
    target[0, :4] = 255
    pred = torch.randint(0, 3, (2, 16, 16), generator=g)
    pred[1, 0, :5] = 4  # class 4: predicted only (false positives), class 3 and 5: empty union
    all_ignore = (torch.randint(0, C, (1, 8, 8), generator=g), torch.full((1, 8, 8), 255))
    single = (torch.full((12, 12), 1), torch.full((12, 12), 1, dtype=torch.uint8))
    return [(pred, target), all_ignore, single]


@pytest.mark.parametrize("batches", [_random_batches(1), _random_batches(2),
                                     _adversarial_batches(), _adversarial_batches()[2:]],
                         ids=["random1", "random2", "adversarial", "single-class"])
def test_matches_torchmetrics(batches):
    miou, per_class, pix_acc = _oracle(batches)
    ours = _ours(batches)
    assert ours["convention"] == "present"
    assert ours["mIoU"] == ours["mIoU_present"] == pytest.approx(miou, abs=1e-6)
    assert ours["pixAcc"] == pytest.approx(pix_acc, abs=1e-6)
    # torchmetrics reports 0 for an empty union where we report NaN ("not present").
    present = torch.tensor(ours["present"])
    torch.testing.assert_close(torch.tensor(ours["IoU"])[present].float(), per_class[present])
    assert all(math.isnan(v) for v, p in zip(ours["IoU"], ours["present"]) if not p)


def test_single_class_is_perfect_under_present_convention_only():
    ours = _ours(_adversarial_batches()[2:], convention="all")
    assert ours["pixAcc"] == 1.0 and ours["mIoU_present"] == 1.0
    assert ours["mIoU"] == ours["mIoU_all"] == pytest.approx(1 / C)


def test_all_class_convention_by_hand():
    # 3 classes; class 2 never appears in target or prediction.
    target = torch.tensor([0, 0, 0, 1, 1, 255, 255])
    pred = torch.tensor([0, 0, 1, 1, 0, 2, 1])
    cm = ConfusionMatrix(3)
    cm.update(pred, target)
    res = cm.compute("all")
    # class 0: tp 2, union 2+1+1=4 -> 0.5; class 1: tp 1, union 2+2-1=3 -> 1/3; class 2: empty.
    assert res["IoU"][:2] == pytest.approx([0.5, 1 / 3])
    assert math.isnan(res["IoU"][2]) and res["present"] == [True, True, False]
    assert res["mIoU"] == res["mIoU_all"] == pytest.approx((0.5 + 1 / 3) / 3)
    assert res["mIoU_present"] == pytest.approx((0.5 + 1 / 3) / 2)
    assert res["pixAcc"] == pytest.approx(3 / 5)
    assert res["acc"][:2] == pytest.approx([2 / 3, 1 / 2]) and math.isnan(res["acc"][2])
    assert res["mAcc"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert res["fwIoU"] == pytest.approx(3 / 5 * 0.5 + 2 / 5 * (1 / 3))
    assert res["labelled_pixels"] == 5 and res["ignored_pixels"] == 2
    assert res["convention"] == "all"


def test_empty_matrix_is_undefined_not_perfect():
    res = ConfusionMatrix(3).compute()
    # pixAcc as the original code reports it, correct / (eps + labelled): 0, never NaN.
    assert res["pixAcc"] == 0.0 and math.isnan(res["mIoU"]) and res["mIoU_all"] == 0.0


def test_no_labelled_pixel_gives_zero_pixacc_not_nan():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([[0, 1], [2, 2]]), torch.full((2, 2), 255))
    res = cm.compute("all")
    assert res["pixAcc"] == 0.0 and res["labelled_pixels"] == 0 and res["ignored_pixels"] == 4
    assert res["mIoU"] == res["mIoU_all"] == 0.0
    assert math.isnan(res["mIoU_present"]) and math.isnan(res["mAcc"]) and math.isnan(res["fwIoU"])


def test_counts_match_python_loop():
    pred, target = _random_batches(3)[0]
    cm = ConfusionMatrix(C)
    cm.update(pred, target)
    expected = torch.zeros(C, C, dtype=torch.int64)
    for p, t in zip(pred.flatten().tolist(), target.flatten().tolist()):
        if t != 255:
            expected[t, p] += 1
    assert torch.equal(cm.mat, expected)


def test_invalid_labels_and_convention_are_reported():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 1]), torch.tensor([0, 7]))
    with pytest.raises(DataError, match="1 pixels have a label outside \\[0, 3\\)"):
        cm.compute()
    assert cm.invalid_targets == cm.invalid == 1 and cm.invalid_predictions == 0
    with pytest.raises(ConfigError, match="'mean'"):
        ConfusionMatrix(3).compute("mean")


@pytest.mark.parametrize("target", [[0, 1, 2, 1], [0, 1, 255, 255]], ids=["labelled", "ignored"])
@pytest.mark.parametrize("bad", [3, -1, 255])
def test_invalid_prediction_blames_the_prediction(bad, target):
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, 2, 1]))
    cm.update(torch.tensor([0, 1, bad, bad]), torch.tensor(target))  # also where the target is ignored
    assert cm.invalid_predictions == 2 and cm.invalid_targets == 0
    with pytest.raises(ValueError, match="2 pixels have a predicted class outside \\[0, 3\\)") as info:
        cm.compute()
    assert not isinstance(info.value, DataError) and "mask" not in str(info.value)
    assert cm.mat.sum() == 4 + 2  # the valid pixels are still counted


def test_invalid_prediction_and_target_on_the_same_pixel_blame_the_prediction():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([5, 0]), torch.tensor([9, 7]))
    assert (cm.invalid_predictions, cm.invalid_targets) == (1, 1)
    with pytest.raises(ValueError, match="1 pixels have a predicted class"):
        cm.compute()


def test_format_table():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 1, 1]))
    text = format_table(cm.compute("all"), ["road", "sidewalk", "sky"])
    lines = text.splitlines()
    assert lines[1].split() == ["road", "50.00", "100.00"]
    assert lines[2].split() == ["sidewalk", "66.67", "66.67"]
    assert lines[3].split() == ["sky", "-", "-"]
    assert "mIoU 38.89 (mean over all classes; over present: 58.33)" in text
