"""Exported masks: round trip against the in-memory metrics, the official Cityscapes evaluator on
labelId PNGs, overwrite refusal and atomic writes."""

import copy
import math

import numpy as np
import pytest
import torch
from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as cs_eval
from cityscapesscripts.helpers.labels import labels as cs_labels
from PIL import Image
from eval_helpers import FakeDataset, PixelNet

from segkit.evaluation.loop import evaluate
from segkit.errors import ConfigError, DataError
from segkit.evaluation.mask_export import MaskExporter
from segkit.evaluation.metrics import ConfusionMatrix

TRAIN_TO_LABEL = np.array([next(lb.id for lb in cs_labels if lb.trainId == t) for t in range(19)],
                          dtype=np.uint8)
IGNORED_LABEL_IDS = [lb.id for lb in cs_labels if lb.ignoreInEval and lb.id >= 0]


class FakeCityscapes(FakeDataset):
    """19 train ids; ground truth only uses train ids 0..12, so 13.. are at most predicted."""

    def __init__(self, sizes, seed=0):
        super().__init__(sizes, num_classes=13, seed=seed)
        self.num_classes = 19
        self.classes = [next(lb.name for lb in cs_labels if lb.trainId == t) for t in range(19)]
        self.palette = np.array([next(lb.color for lb in cs_labels if lb.trainId == t)
                                 for t in range(19)], dtype=np.uint8)

    def name(self, i):
        city = ("aachen", "bochum")[i % 2]
        return f"{city}/{city}_000000_{i:06d}"

    def encode_prediction(self, pred):
        return TRAIN_TO_LABEL[pred]


def test_exported_labels_score_like_the_in_memory_matrix(tmp_path):
    ds = FakeDataset([(20, 30), (33, 17), (24, 24), (9, 40)], num_classes=5, unlabelled={3})
    exporter = MaskExporter(tmp_path / "masks", ds, side_by_side=True)
    result = evaluate(PixelNet(5), ds, callback=exporter, num_workers=0, progress=False)

    rescored = ConfusionMatrix(5)
    for i in range(len(ds)):
        h, w = ds.images[i].shape[:2]
        label = Image.open(exporter.path("labels", ds.name(i)))
        assert label.mode == "L" and label.size == (w, h)
        pred = np.asarray(label).astype(np.int64) - 1  # ADE20K submission: prediction + 1
        color = Image.open(exporter.path("color", ds.name(i)))
        assert color.mode == "P"
        assert np.array_equal(np.asarray(color.convert("RGB")), ds.palette[pred])
        assert Image.open(exporter.path("overlay", ds.name(i))).size == (w, h)
        panels = 2 if ds.masks[i] is None else 3
        assert Image.open(exporter.path("compare", ds.name(i))).size == (panels * w, h)
        if ds.masks[i] is not None:
            rescored.update(torch.from_numpy(pred), torch.from_numpy(ds.masks[i]))
    assert rescored.compute() == {k: v for k, v in result.items()
                                  if k not in ("num_images", "seconds")}
    assert not [p for p in (tmp_path / "masks").rglob(".*")]  # no temporary files left


def test_official_cityscapes_evaluator_agrees_on_exported_label_ids(tmp_path):
    ds = FakeCityscapes([(16, 32), (24, 20), (20, 28)])
    rng = np.random.default_rng(1)
    exporter = MaskExporter(tmp_path / "pred", ds, overlay=False)
    ours = ConfusionMatrix(19)
    gt_files = []
    for i, mask in enumerate(ds.masks):
        # Mostly right, with errors into train ids 0..15: 13..15 are only ever predicted (false
        # positives), 16..18 neither labelled nor predicted.
        pred = np.where(mask == 255, rng.integers(0, 13, mask.shape), mask).astype(np.int64)
        wrong = rng.random(mask.shape) < 0.3
        pred[wrong] = rng.integers(0, 16, int(wrong.sum()))
        exporter(i, ds.images[i], mask, pred)
        ours.update(torch.from_numpy(pred), torch.from_numpy(mask))
        label_ids = TRAIN_TO_LABEL[np.where(mask == 255, 0, mask)]
        ignored = mask == 255
        label_ids[ignored] = rng.choice(IGNORED_LABEL_IDS, size=int(ignored.sum()))
        gt = tmp_path / "gtFine" / "val" / f"{ds.name(i)}_gtFine_labelIds.png"
        gt.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(label_ids).save(gt)
        gt_files.append(str(gt))
    ours = ours.compute("present")

    args = copy.copy(cs_eval.args)
    args.evalInstLevelScore = False
    args.evalPixelAccuracy = False  # needs np.in1d, removed in numpy 2.4
    args.JSONOutput = False
    args.quiet = True
    preds = [str(exporter.path("labels", ds.name(i))) for i in range(len(ds))]
    official = cs_eval.evaluateImgLists(preds, gt_files, args)

    assert ours["present"] == [True] * 16 + [False] * 3
    assert ours["mIoU"] == pytest.approx(official["averageScoreClasses"], abs=1e-12)
    assert ours["mIoU_all"] < ours["mIoU"]
    for name, iou in zip(ds.classes, ours["IoU"]):
        ref = official["classScores"][name]
        assert (math.isnan(iou) and math.isnan(ref)) or iou == pytest.approx(ref, abs=1e-12)


def test_refuses_non_empty_directory_unless_overwrite(tmp_path):
    ds = FakeDataset([(8, 8)])
    MaskExporter(tmp_path, ds)  # existing but empty is fine
    (tmp_path / "old.png").write_bytes(b"x")
    with pytest.raises(ConfigError, match=f"{tmp_path}.*export.overwrite=true"):
        MaskExporter(tmp_path, ds)
    exporter = MaskExporter(tmp_path, ds, overwrite=True)
    pred = np.ones((8, 8), np.int64)
    exporter(0, ds.images[0], ds.masks[0], pred)
    exporter(0, ds.images[0], ds.masks[0], 2 * pred)
    assert np.asarray(Image.open(exporter.path("labels", ds.name(0)))).max() == 3


def test_failed_write_leaves_neither_partial_nor_temporary_file(tmp_path, monkeypatch):
    ds = FakeDataset([(8, 8)])
    exporter = MaskExporter(tmp_path, ds)

    def broken_save(self, fp, *args, **kwargs):
        (fp.write if hasattr(fp, "write") else open(fp, "wb").write)(b"\x89PNG truncated")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        exporter(0, ds.images[0], ds.masks[0], np.zeros((8, 8), np.int64))
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
    with pytest.raises(DataError, match="outside"):
        exporter.path("labels", "../escape")
