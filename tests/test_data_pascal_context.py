"""Pascal Context: RLE decoding, the prepare command (layout, errors, resume) and both label settings."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from dataclasses import replace

from config_helpers import dataset_settings
from pycocotools import mask as mask_utils

from data_helpers import (
    coco_rle,
    make_pascal_context,
    make_pascal_context_converted,
    random_image,
    save,
)
from segkit.data import DATASETS, PascalContextDataset, build_dataset, prepare
from segkit.data.base import read_mask
from segkit.data.pascal_context import (
    CONTEXT_CATEGORY_IDS,
    PASCAL_CONTEXT60_CLASSES,
    PASCAL_CONTEXT60_PALETTE,
    PASCAL_CONTEXT_CLASSES,
    PASCAL_CONTEXT_PALETTE,
    context_value,
)
from segkit.data.label_space import LabelSpace
from segkit.data.rle import decode_rle
from segkit.errors import ConfigError, DataError

COUNTS = ["--expect-counts", "3,2"]
BASE = Path("VOCdevkit", "VOC2010")


def run_prepare(root, *extra):
    return prepare.main(["pascal_context", "--root", str(root), *COUNTS, "--workers", "1", *extra])


def error_line(capsys) -> str:
    return capsys.readouterr().err.rstrip("\n").split("\n")[-1]


def masks_of(root) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((root / BASE / "SegmentationClassContext").iterdir())}


@pytest.fixture
def raw(tmp_path):
    root = tmp_path / "pc"
    return root, make_pascal_context(root)


# --- RLE ---------------------------------------------------------------------------------------

def test_rle_decoder_matches_pycocotools():
    rng = np.random.default_rng(0)
    for trial in range(200):
        h, w = (int(v) for v in rng.integers(1, 40, 2))
        if trial % 3 == 0:
            m = rng.random((h, w)) < rng.random()
        elif trial % 3 == 1:
            m = np.zeros((h, w), bool)
            m[rng.integers(0, h):, : rng.integers(1, w + 1)] = True
        else:
            m = np.full((h, w), trial % 2 == 0)
        encoded = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        ours = decode_rle({"size": encoded["size"], "counts": encoded["counts"].decode()})
        assert ours.shape == (h, w) and np.array_equal(ours, mask_utils.decode(encoded).astype(bool)), trial
        plain = coco_rle(m, compressed=False)  # uncompressed run lengths, as pycocotools reads them
        reference = mask_utils.decode(mask_utils.frPyObjects(plain, h, w)).astype(bool)
        assert np.array_equal(decode_rle(plain), reference) and np.array_equal(reference, m)
    big = np.zeros((500, 375), bool)  # run lengths that need several 5-bit groups, both signs
    big[100:400, 50:300] = True
    big[::7] = ~big[::7]
    assert np.array_equal(decode_rle(mask_utils.encode(np.asfortranarray(big.astype(np.uint8)))), big)


@pytest.mark.parametrize("rle, match", [
    ({"size": [2, 2], "counts": "1"}, "add up to 1 pixels, not 2x2"),
    ({"size": [2, 2], "counts": [1, 2]}, "add up to 3"),
    ({"size": [2, 2], "counts": [5, -1]}, "negative"),
    ({"size": [2, 2], "counts": "\x7f"}, "outside '0'..'o'"),
    ({"size": [2, 2], "counts": "P"}, "middle of a number"),  # 'P' = 32: continuation bit set
    ({"size": [2], "counts": "4"}, r"\[height, width\]"),
    ({"counts": "4"}, "'counts' and 'size'"),
    ({"size": [2, 2], "counts": 4}, "compressed string or a list"),
])
def test_rle_decoder_rejects_malformed_input(rle, match):
    with pytest.raises(ValueError, match=match):
        decode_rle(rle)


# --- label table --------------------------------------------------------------------------------

def test_category_ids_classes_and_palettes():
    assert len(CONTEXT_CATEGORY_IDS) == 60 == len(set(CONTEXT_CATEGORY_IDS))
    assert list(CONTEXT_CATEGORY_IDS) == sorted(CONTEXT_CATEGORY_IDS) and CONTEXT_CATEGORY_IDS[0] == 0
    # The ids as the original code lists them (unsorted, PyTorch-Encoding pcontext.py).
    original = [0, 2, 259, 260, 415, 324, 9, 258, 144, 18, 19, 22, 23, 397, 25, 284, 158, 159, 416, 33, 162,
                420, 454, 295, 296, 427, 44, 45, 46, 308, 59, 440, 445, 31, 232, 65, 354, 424, 68, 326, 72, 458,
                34, 207, 80, 355, 85, 347, 220, 349, 360, 98, 187, 104, 105, 366, 189, 368, 113, 115]
    assert sorted(original) == list(CONTEXT_CATEGORY_IDS)
    # np.digitize(right=True) over the sorted ids, what the reference converters do for listed ids.
    assert all(context_value(c) == np.digitize(c, CONTEXT_CATEGORY_IDS, right=True) for c in original)
    assert [context_value(c) for c in (1, 3, 459, 10_000)] == [0, 0, 0, 0]  # unknown: background
    assert len(PASCAL_CONTEXT_CLASSES) == 59 == len(set(PASCAL_CONTEXT_CLASSES))
    assert PASCAL_CONTEXT_CLASSES[:3] == ("aeroplane", "bag", "bed") and PASCAL_CONTEXT_CLASSES[-1] == "wood"
    assert PASCAL_CONTEXT_CLASSES[context_value(284) - 1] == "person"
    assert PASCAL_CONTEXT_CLASSES[context_value(427) - 1] == "tvmonitor"
    assert PASCAL_CONTEXT60_CLASSES == ("background", *PASCAL_CONTEXT_CLASSES)
    # mmsegmentation's palettes: first and last entries of PascalContextDataset / ...59.
    assert PASCAL_CONTEXT60_PALETTE.shape == (60, 3) and PASCAL_CONTEXT_PALETTE.shape == (59, 3)
    assert PASCAL_CONTEXT60_PALETTE[0].tolist() == [120, 120, 120]
    assert PASCAL_CONTEXT_PALETTE[0].tolist() == [180, 120, 120]
    assert PASCAL_CONTEXT_PALETTE[-1].tolist() == [31, 0, 255]


# --- prepare ------------------------------------------------------------------------------------

def test_prepare_writes_the_converted_layout(raw, capsys):
    root, expected = raw
    assert run_prepare(root) == 0
    out = capsys.readouterr()
    assert "5 masks, 5 converted now" in out.out
    assert "outside the 59 classes were painted as background (0): 1, 3" in out.err
    base = root / BASE
    masks = base / "SegmentationClassContext"
    assert sorted(p.name for p in masks.iterdir()) == [f"{n}.png" for n in sorted(expected)]
    for name, truth in expected.items():
        assert np.array_equal(read_mask(masks / f"{name}.png"), truth), name
    first = read_mask(masks / "2008_000000.png")  # 12x16; by hand from the layers make_pascal_context paints:
    assert first[0, 5] == 1  # aeroplane (category 2), the 1st class
    assert first[0, 0] == 0  # aeroplane painted over by category 1, not among the 59: background
    assert first[6, 8] == first[9, 10] == 37  # person (284), the 37th class, from plain run lengths
    assert first[11, 9] == 0  # person painted over by category 3, not among the 59: background
    assert first[11, 0] == 59  # wood (458) painted over category 3
    assert set(np.unique(first)) == {0, 1, 37, 59}
    lists = base / "ImageSets" / "SegmentationContext"
    assert (lists / "train.txt").read_text().split() == ["2008_000000", "2008_000001", "2008_000002"]
    assert (lists / "val.txt").read_text().split() == ["2008_000003", "2008_000004"]
    assert not list(base.rglob("*.tmp"))

    before = {p: p.stat().st_mtime_ns for p in masks.iterdir()}
    assert run_prepare(root) == 0  # rerun: everything is there, nothing rewritten
    assert "5 masks, 0 converted now" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in masks.iterdir()} == before


def test_prepare_in_parallel_gives_the_same_files(tmp_path):
    make_pascal_context(tmp_path / "one")
    make_pascal_context(tmp_path / "two")
    assert run_prepare(tmp_path / "one") == 0
    assert prepare.main(["pascal_context", "--root", str(tmp_path / "two"), *COUNTS, "--workers", "2"]) == 0
    assert masks_of(tmp_path / "one") == masks_of(tmp_path / "two")


def test_prepare_json_elsewhere_and_test_phase_images_are_skipped(tmp_path):
    root = tmp_path / "pc"
    make_pascal_context(root)
    source = root / BASE / "trainval_merged.json"
    data = json.loads(source.read_text())
    data["images"].append({"image_id": 2010999999, "file_name": "2010_999999.jpg", "phase": "test",
                           "height": 4, "width": 4})  # no JPEG: never looked for
    moved = tmp_path / "annotations.json"
    moved.write_text(json.dumps(data))
    source.unlink()
    assert run_prepare(root) == 2  # not found in the default places
    assert run_prepare(root, "--json", str(moved)) == 0
    assert len(PascalContextDataset(root, "val")) == 2


def test_interrupted_conversion_resumes_to_identical_files(tmp_path, monkeypatch, capsys):
    clean, broken = tmp_path / "clean", tmp_path / "broken"
    make_pascal_context(clean)
    make_pascal_context(broken)
    assert run_prepare(clean) == 0

    real, calls = prepare._write_context_mask, []

    def dies_on_the_third(image):
        calls.append(image.name)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(image)

    monkeypatch.setattr(prepare, "_write_context_mask", dies_on_the_third)
    assert run_prepare(broken) == 130
    assert "run the same command again to resume" in error_line(capsys)
    monkeypatch.setattr(prepare, "_write_context_mask", real)
    masks = broken / BASE / "SegmentationClassContext"
    assert sorted(p.name for p in masks.iterdir()) == ["2008_000000.png", "2008_000001.png"]
    with pytest.raises(DataError, match="split 'train' not found"):  # lists come last: no half split
        PascalContextDataset(broken, "train")
    # What a killed process can leave: a temporary file, and a truncated PNG from a copy.
    (masks / "2008_000002.png.tmp").write_bytes(b"partial")
    good = (clean / BASE / "SegmentationClassContext" / "2008_000003.png").read_bytes()
    (masks / "2008_000003.png").write_bytes(good[: len(good) // 2])

    assert run_prepare(broken) == 0
    assert "5 masks, 3 converted now" in capsys.readouterr().out  # the two complete ones were kept
    assert masks_of(broken) == masks_of(clean)
    for split in ("train", "val"):
        lists = Path("ImageSets", "SegmentationContext", f"{split}.txt")
        assert (broken / BASE / lists).read_text() == (clean / BASE / lists).read_text()


def _edit_json(root, edit):
    path = root / BASE / "trainval_merged.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["images"][1].pop("phase"), "images[1] has no 'phase' key; is this the Detail API's"),
    (lambda d: d.pop("annos_segmentation"), "the top level has no 'annos_segmentation' key"),
    (lambda d: d["annos_segmentation"][0].pop("segmentation"), "annos_segmentation[0] has no 'segmentation'"),
    (lambda d: d["annos_segmentation"][2].update(image_id=7), "refers to image_id 7, which 'images' does not"),
    (lambda d: d["images"][0].update(height="12"), "images[0] has height='12', expected an integer >= 1"),
    (lambda d: d["annos_segmentation"][0]["segmentation"].update(counts="1"),
     "annos_segmentation[0] (id 1, image 2008_000000): RLE run lengths add up to 1 pixels, not 12x16"),
    (lambda d: d["annos_segmentation"][0]["segmentation"].update(size=[16, 12], counts=[192]),
     "segmentation is 12x16 but the image is 16x12"),
])
def test_bad_annotations_name_the_json(raw, capsys, edit, message):
    root, _ = raw
    path = _edit_json(root, edit)
    assert run_prepare(root) == 2
    err = error_line(capsys)
    assert err.startswith(f"error: {path}") or f"e.g. {path}" in err
    assert message in err
    assert not (root / BASE / "ImageSets").exists()


def test_prepare_checks(raw, capsys):
    root, _ = raw
    json_path = root / BASE / "trainval_merged.json"
    assert prepare.main(["pascal_context", "--root", str(root), "--workers", "1"]) == 2  # official counts
    assert error_line(capsys) == (f"error: {json_path}: unexpected image counts (train: 3 images, expected 4998; "
                                  f"val: 2 images, expected 5105); is it the full trainval_merged.json? Pass "
                                  f"--no-expect-counts for a subset")
    image = root / BASE / "JPEGImages" / "2008_000003.jpg"
    image.unlink()
    assert run_prepare(root) == 2
    assert error_line(capsys).startswith(f"error: {image} not found (1 of the 5 images in trainval_merged.json "
                                         f"are missing from {image.parent})")
    save(image, random_image(np.random.default_rng(0), 10, 16))  # not the size the json gives
    assert run_prepare(root) == 2
    assert f"{image}: image is 16x10 but trainval_merged.json gives 16x12" in error_line(capsys)
    assert prepare.main(["pascal_context", "--root", str(root / "absent"), "--no-expect-counts"]) == 2
    assert "VOCtrainval_03-May-2010.tar" in error_line(capsys)


def test_cli_bad_json_is_one_line_and_exit_status_2(raw):
    root, _ = raw
    path = root / BASE / "trainval_merged.json"
    path.write_text('{"images": [')
    result = subprocess.run(
        [sys.executable, "-m", "segkit.data.prepare", "pascal_context", "--root", str(root), "--no-expect-counts"],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {path}: not valid JSON (Expecting value: line 1 column 13 (char 12))"]


# --- dataset ------------------------------------------------------------------------------------

def test_dataset_59_and_60_classes(raw):
    root, expected = raw
    assert run_prepare(root) == 0
    ds59, ds60 = PascalContextDataset(root, "train"), PascalContextDataset(root, "train", num_classes=60)
    assert (len(ds59), ds59.num_classes, ds59.classes) == (3, 59, list(PASCAL_CONTEXT_CLASSES))
    assert (ds60.num_classes, ds60.classes[0]) == (60, "background")
    assert np.array_equal(ds59.palette, PASCAL_CONTEXT_PALETTE)
    assert ds59.name(0) == "2008_000000" and ds59.image_path(0) == root / BASE / "JPEGImages" / "2008_000000.jpg"
    for i in range(len(ds59)):
        truth = expected[ds59.name(i)]
        image, mask59 = ds59.load(i)
        assert image.shape == (12, 16, 3)
        assert np.array_equal(mask59 == 255, truth == 0)  # background is ignored
        assert np.array_equal(mask59[truth > 0], truth[truth > 0] - 1)
        assert np.array_equal(ds60.load(i)[1], truth)  # background is class 0
    # Submission format: the 0..59 values of SegmentationClassContext in both settings.
    assert ds59.encode_prediction(np.array([[0, 36, 58]])).tolist() == [[1, 37, 59]]
    assert ds60.encode_prediction(np.array([[0, 37, 59]])).tolist() == [[0, 37, 59]]
    with pytest.raises(ValueError):
        ds59.encode_prediction(np.array([[59]]))
    with pytest.raises(ConfigError, match="dataset.num_classes=21 is not a Pascal Context setting: use 59"):
        PascalContextDataset(root, "train", num_classes=21)


def test_mmsegmentation_converted_tree_loads(tmp_path):
    make_pascal_context_converted(tmp_path, {"train": 4, "val": 2})
    ds = PascalContextDataset(tmp_path, "train")
    raw = read_mask(ds.samples[0].mask)
    mask = ds.load(0)[1]
    assert np.array_equal(mask[raw == 0], np.full((raw == 0).sum(), 255))
    assert np.array_equal(mask[raw > 0], raw[raw > 0] - 1)
    inner = PascalContextDataset(tmp_path / BASE, "val")  # ROOT may be the VOC2010 folder itself
    assert inner.samples == PascalContextDataset(tmp_path, "val").samples and len(inner) == 2
    save(inner.samples[0].mask, np.full((12, 16), 60, np.uint8))
    with pytest.raises(DataError, match=r"mask values 60 are outside the valid values 0\.\.59"):
        inner.load(0)


def test_layout_errors(tmp_path):
    make_pascal_context_converted(tmp_path)
    with pytest.raises(DataError, match=r"split 'test' not found .*\(splits found: train, val\)") as err:
        PascalContextDataset(tmp_path, "test")
    assert "python -m segkit.data.prepare pascal_context --root" in str(err.value)
    base = tmp_path / BASE
    (base / "SegmentationClassContext" / "2008_000001.png").unlink()
    (base / "JPEGImages" / "2008_000002.jpg").unlink()
    with pytest.raises(DataError) as err:
        PascalContextDataset(tmp_path, "train")
    assert "1 image(s) listed in" in str(err.value) and "(2008_000002)" in str(err.value)
    assert "1 mask(s) listed in" in str(err.value) and "(2008_000001)" in str(err.value)
    (base / "ImageSets" / "SegmentationContext" / "val.txt").write_text("\n")
    with pytest.raises(DataError, match="split is empty: .*val.txt lists no images"):
        PascalContextDataset(tmp_path, "val")


# --- config -------------------------------------------------------------------------------------

def dataset_cfg(*overrides):
    return dataset_settings("pascal_context", *overrides)


def test_config_recipe_and_build_dataset(tmp_path):
    assert "pascal_context" in DATASETS
    assert type(dataset_cfg()) is type(dataset_settings("ade20k"))  # the same keys as ADE20K
    cfg = dataset_cfg(f"dataset.root={tmp_path}")
    assert (cfg.num_classes, cfg.base_size, cfg.crop_size, cfg.epochs) == (59, 520, 480, 80)
    assert cfg.eval_scales == [0.5, 0.75, 1.0, 1.25, 1.5, 1.75] and cfg.miou_convention == "all"
    assert (cfg.train_split, cfg.val_split) == ("train", "val")
    make_pascal_context_converted(tmp_path)
    train, val = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    assert isinstance(train, PascalContextDataset) and (len(train), len(val), train.num_classes) == (3, 2, 59)
    assert build_dataset(replace(cfg, num_classes=60), "val").num_classes == 60
    with pytest.raises(ConfigError, match="dataset.num_classes=21 is not a Pascal Context setting"):
        build_dataset(replace(cfg, num_classes=21), "val")


def test_label_space_without_the_data_follows_num_classes():
    cfg = dataset_cfg("dataset.root=/nonexistent")
    space59 = LabelSpace.from_settings(cfg)
    space60 = LabelSpace.from_settings(replace(cfg, num_classes=60))
    assert (space59.num_classes, space60.num_classes, space60.classes[0]) == (59, 60, "background")
    assert space59.encode_prediction(np.array([[0, 58]])).tolist() == [[1, 59]]
    assert space60.encode_prediction(np.array([[0, 59]])).tolist() == [[0, 59]]
