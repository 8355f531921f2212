"""Label tables against the official definitions, and prediction encoding."""
import numpy as np
import pytest
from cityscapesscripts.helpers.labels import labels as cs_labels

from data_helpers import make_ade, make_cityscapes, save
from segkit.data import ADE20K_CLASSES, ADE20K_PALETTE, ADE20KDataset, CityscapesDataset
from segkit.data.base import read_mask
from segkit.data.cityscapes import (
    CITYSCAPES_CLASSES,
    CITYSCAPES_PALETTE,
    LABEL_ID_LUT,
    TRAIN_ID_LUT,
    TRAIN_ID_TO_LABEL_ID,
)


def test_ade20k_table_shape_and_known_entries():
    assert len(ADE20K_CLASSES) == 150 == len(set(ADE20K_CLASSES))
    assert ADE20K_PALETTE.shape == (150, 3) and ADE20K_PALETTE.dtype == np.uint8
    # Spot checks against objectInfo150.txt (1-based there) and the CSAIL colour table.
    assert ADE20K_CLASSES[0] == "wall" and ADE20K_CLASSES[2] == "sky" and ADE20K_CLASSES[149] == "flag"
    assert ADE20K_CLASSES[12] == "person" and ADE20K_CLASSES[20] == "car"
    assert ADE20K_PALETTE[0].tolist() == [120, 120, 120] and ADE20K_PALETTE[149].tolist() == [92, 0, 255]


def test_ade20k_mask_mapping(tmp_path):
    make_ade(tmp_path)
    ds = ADE20KDataset(tmp_path, "training")
    assert (ds.num_classes, ds.ignore_index, ds.split) == (150, 255, "training")
    for i in range(len(ds)):
        raw = read_mask(ds.samples[i].mask)
        _, mask = ds.load(i)
        assert mask.dtype == np.uint8
        assert np.array_equal(mask == 255, raw == 0)
        assert np.array_equal(mask[raw > 0].astype(int), raw[raw > 0].astype(int) - 1)


def test_ade20k_encode_prediction_is_train_id_plus_one(tmp_path):
    ds = ADE20KDataset(make_ade(tmp_path), "validation")
    pred = np.array([[0, 1], [148, 149]])
    encoded = ds.encode_prediction(pred)
    assert encoded.dtype == np.uint8 and encoded.tolist() == [[1, 2], [149, 150]]
    with pytest.raises(ValueError):
        ds.encode_prediction(np.array([[150]]))


def test_cityscapes_table_matches_cityscapesscripts():
    for label in cs_labels:
        if label.id < 0:  # "license plate" never occurs in labelIds PNGs
            continue
        expected = 255 if label.trainId in (255, -1) else label.trainId
        assert LABEL_ID_LUT[label.id] == expected, label.name
    train_labels = sorted((l for l in cs_labels if 0 <= l.trainId < 255), key=lambda l: l.trainId)
    assert [l.name for l in train_labels] == list(CITYSCAPES_CLASSES)
    assert [tuple(l.color) for l in train_labels] == [tuple(c) for c in CITYSCAPES_PALETTE.tolist()]
    assert TRAIN_ID_TO_LABEL_ID.tolist() == [l.id for l in train_labels]
    assert (LABEL_ID_LUT[34:] == -1).all()  # no labelId above 33 exists
    assert TRAIN_ID_LUT[255] == 255 and (TRAIN_ID_LUT[19:255] == -1).all()


def test_cityscapes_label_ids_and_train_ids_agree(tmp_path):
    make_cityscapes(tmp_path)
    ds = CityscapesDataset(tmp_path, "train")
    assert ds.name(0) == "aachen/aachen_000000_000019"
    assert ds.image_path(0).name == "aachen_000000_000019_leftImg8bit.png"
    _, from_label_ids = ds.load(0)
    raw = read_mask(ds.samples[0].mask)
    expected = np.array([next((l.trainId for l in cs_labels if l.id == v), 255) for v in range(34)])
    expected[expected < 0] = 255
    assert np.array_equal(from_label_ids, expected[raw])

    # A pre-converted labelTrainIds file next to it is preferred and gives the same mask.
    train_ids_path = str(ds.samples[0].mask).replace("labelIds", "labelTrainIds")
    save(tmp_path / train_ids_path, from_label_ids)
    ds = CityscapesDataset(tmp_path, "train")
    assert ds.samples[0].mask.name.endswith("_gtFine_labelTrainIds.png")
    assert np.array_equal(ds.load(0)[1], from_label_ids)


def test_cityscapes_encode_prediction_gives_label_ids(tmp_path):
    ds = CityscapesDataset(make_cityscapes(tmp_path), "val")
    pred = np.arange(19).reshape(1, 19)
    encoded = ds.encode_prediction(pred)
    assert encoded.dtype == np.uint8
    assert encoded[0].tolist() == [l.id for l in sorted(
        (l for l in cs_labels if 0 <= l.trainId < 255), key=lambda l: l.trainId)]
    # Round trip through the label table.
    assert np.array_equal(LABEL_ID_LUT[encoded], pred)
