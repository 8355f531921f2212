"""Dataset loading contract and every bad-input case."""
import numpy as np
import pytest
import torch

from data_helpers import make_ade, make_cityscapes, make_folder, random_image, save
from segkit.data import ADE20KDataset, CityscapesDataset, FolderDataset, PascalContextDataset, SegmentationDataset
from segkit.data.base import bit_palette, format_values
from segkit.errors import DataError


def test_folder_dataset_contract(tmp_path):
    make_folder(tmp_path)
    ds = FolderDataset(tmp_path, "train")
    assert isinstance(ds, SegmentationDataset)
    assert (len(ds), ds.classes, ds.num_classes, ds.ignore_index) == (2, ["sky", "road", "car"], 3, 255)
    assert ds.palette.shape == (3, 3) and ds.palette.dtype == np.uint8
    assert np.array_equal(ds.palette, bit_palette(3))
    assert ds.name(1) == "img1" and ds.image_path(1) == tmp_path / "images/train/img1.png"
    image, mask = ds.load(0)
    assert image.dtype == np.uint8 and image.shape == (20, 28, 3)
    assert mask.dtype == np.uint8 and mask.shape == (20, 28)
    assert set(np.unique(mask)) <= {0, 1, 2, 255} and (mask[0] == 255).all()

    x, y = ds[0]
    assert x.dtype == torch.float32 and x.shape == (3, 20, 28)
    assert y.dtype == torch.int64 and torch.equal(y, torch.from_numpy(mask).long())
    expected = (image[..., 0] / 255.0 - 0.485) / 0.229  # ImageNet normalisation without a transform
    assert torch.allclose(x[0], torch.from_numpy(expected).float(), atol=1e-5)
    assert np.array_equal(ds.encode_prediction(np.array([[2, 0]])), [[2, 0]])


def test_folder_nested_names_palette_and_ignore_values(tmp_path):
    make_folder(tmp_path, classes="classes: [a, b]\nignore_index: [254, 255]\n"
                                   "palette: [[1, 2, 3], [4, 5, 6]]\n")
    rng = np.random.default_rng(1)
    save(tmp_path / "images/train/sub/x.jpg", random_image(rng, 20, 28))
    save(tmp_path / "masks/train/sub/x.png", np.full((20, 28), 254, np.uint8))
    ds = FolderDataset(tmp_path, "train", map_out_of_range_to_ignore=True)
    assert ds.palette.tolist() == [[1, 2, 3], [4, 5, 6]]
    assert [ds.name(i) for i in range(len(ds))] == ["img0", "img1", "sub/x"]
    assert (ds.load(2)[1] == 255).all()


def test_folder_json_class_file_and_unlabelled_split(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "classes.yaml").unlink()
    (tmp_path / "classes.json").write_text('{"classes": ["sky", "road", "car"]}')
    save(tmp_path / "images/test/a.png", random_image(np.random.default_rng(0), 8, 8))
    ds = FolderDataset(tmp_path, "test", require_masks=False)
    image, mask = ds.load(0)
    assert mask is None
    assert (ds[0][1] == 255).all()  # unlabelled -> all ignore
    with pytest.raises(DataError, match="masks/test"):
        FolderDataset(tmp_path, "test")


@pytest.mark.parametrize("factory, split, expected", [
    (ADE20KDataset, "training", ["ADEChallengeData2016/images/{training,validation}/*.jpg",
                                 "python -m segkit.data.prepare ade20k --root"]),
    (CityscapesDataset, "train", ["leftImg8bit/{train,val,test}/<city>/*_leftImg8bit.png",
                                  "python -m segkit.data.prepare cityscapes --root"]),
    (FolderDataset, "train", ["classes.yaml", "images/<split>/", "masks/<split>/"]),
    (PascalContextDataset, "train", ["VOCdevkit/VOC2010/SegmentationClassContext/<name>.png",
                                     "ImageSets/SegmentationContext/{train,val}.txt",
                                     "python -m segkit.data.prepare pascal_context --root"]),
])
def test_missing_root_shows_layout_and_command(tmp_path, factory, split, expected):
    with pytest.raises(DataError) as err:
        factory(tmp_path / "nowhere", split)
    assert f"not found: {tmp_path / 'nowhere'} does not exist." in str(err.value)
    for text in expected:
        assert text in str(err.value)


def test_ade20k_root_may_be_the_extracted_folder_itself(tmp_path):
    make_ade(tmp_path)
    inner = ADE20KDataset(tmp_path / "ADEChallengeData2016", "validation")
    outer = ADE20KDataset(tmp_path, "validation")
    assert inner.samples == outer.samples and inner.name(0) == "ADE_val_00000001"


def test_unknown_split_lists_the_available_ones(tmp_path):
    with pytest.raises(DataError, match=r"'val' not found.*splits found: training, validation"):
        ADE20KDataset(make_ade(tmp_path), "val")


def test_unpaired_files_are_named(tmp_path):
    make_ade(tmp_path, {"training": 5})
    base = tmp_path / "ADEChallengeData2016"
    for i in (1, 2, 3, 4):
        (base / f"annotations/training/ADE_train_{i:08d}.png").unlink()
    save(base / "annotations/training/stray.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(DataError) as err:
        ADE20KDataset(tmp_path, "training")
    message = str(err.value)
    assert "4 image(s)" in message and "ADE_train_00000001, ADE_train_00000002, ADE_train_00000003, ..." in message
    assert "1 mask(s)" in message and "stray" in message


def test_empty_split(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "images/empty").mkdir()
    (tmp_path / "masks/empty").mkdir()
    with pytest.raises(DataError, match="empty: no images found in .*images/empty"):
        FolderDataset(tmp_path, "empty")


def test_corrupt_files_are_named_at_load_time(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "images/train/img0.png").write_bytes(b"not a png")
    mask_path = tmp_path / "masks/train/img1.png"
    mask_path.write_bytes(mask_path.read_bytes()[:40])  # truncated
    ds = FolderDataset(tmp_path, "train")  # listing alone does not open files
    with pytest.raises(DataError, match=r"img0.png: cannot decode image"):
        ds.load(0)
    with pytest.raises(DataError, match=r"masks/train/img1.png: cannot decode mask"):
        ds.load(1)


def test_mask_size_mismatch(tmp_path):
    make_folder(tmp_path)
    save(tmp_path / "masks/train/img0.png", np.zeros((10, 28), np.uint8))
    with pytest.raises(DataError, match=r"img0.png: mask is 28x10 but its image .* is 28x20"):
        FolderDataset(tmp_path, "train").load(0)


def test_out_of_range_mask_values(tmp_path):
    make_folder(tmp_path)
    mask = np.zeros((20, 28), np.uint8)
    mask[0, :3] = [3, 7, 200]
    save(tmp_path / "masks/train/img0.png", mask)
    with pytest.raises(DataError, match=r"img0.png: mask values 3, 7, 200 are outside the valid "
                                        r"values 0\.\.2, 255"):
        FolderDataset(tmp_path, "train").load(0)
    loaded = FolderDataset(tmp_path, "train", map_out_of_range_to_ignore=True).load(0)[1]
    assert loaded[0, :4].tolist() == [255, 255, 255, 0]


def test_cityscapes_out_of_range_label_id(tmp_path):
    make_cityscapes(tmp_path, {"val": 1})
    save(tmp_path / "gtFine/val/aachen/aachen_000000_000019_gtFine_labelIds.png", np.full((16, 32), 40, np.uint8))
    with pytest.raises(DataError, match=r"mask values 40 are outside the valid values 0\.\.33"):
        CityscapesDataset(tmp_path, "val").load(0)


def test_grayscale_rgba_and_palette_images_become_rgb(tmp_path):
    make_folder(tmp_path)
    gray = np.random.default_rng(0).integers(0, 256, (20, 28), dtype=np.uint8)
    save(tmp_path / "images/train/img0.png", gray)
    rgba = np.dstack([random_image(np.random.default_rng(1), 20, 28), np.full((20, 28), 7, np.uint8)])
    save(tmp_path / "images/train/img1.png", rgba)
    ds = FolderDataset(tmp_path, "train")
    image = ds.load(0)[0]
    assert image.shape == (20, 28, 3) and all(np.array_equal(image[..., c], gray) for c in range(3))
    assert np.array_equal(ds.load(1)[0], rgba[..., :3])  # alpha dropped
    assert ds[1][0].shape == (3, 20, 28)


def test_16_bit_images_are_rejected(tmp_path):
    make_folder(tmp_path)
    save(tmp_path / "images/train/img0.png", np.full((20, 28), 4000, np.uint16))
    with pytest.raises(DataError, match=r"img0.png: I;16 image has more than 8 bits per channel; convert"):
        FolderDataset(tmp_path, "train").load(0)


def test_colour_masks_are_rejected(tmp_path):
    make_folder(tmp_path)
    save(tmp_path / "masks/train/img0.png", np.zeros((20, 28, 3), np.uint8))
    with pytest.raises(DataError, match=r"img0.png: mask has PIL mode RGB; expected a single-channel"):
        FolderDataset(tmp_path, "train").load(0)


@pytest.mark.parametrize("content, match", [
    ("classes: []\n", "'classes' must be a list of 1 to 255 distinct names"),
    ("classes: [a, a]\n", "distinct names"),
    ("classes: [a, b]\nignore_index: 1\n", "'ignore_index' must be mask value"),
    ("classes: [a, b]\npalette: [[0, 0, 0]]\n", "'palette' must hold 2"),
    ("classes: [a]\ncolours: []\n", r"unknown key\(s\) \['colours'\]"),
    ("classes: [a\n", "cannot parse"),
    ("- a\n- b\n", "expected a mapping"),
])
def test_bad_class_files(tmp_path, content, match):
    make_folder(tmp_path, classes=content)
    with pytest.raises(DataError, match=match) as err:
        FolderDataset(tmp_path, "train")
    assert "classes.yaml" in str(err.value)


def test_missing_class_file_and_jpeg_masks(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "classes.yaml").unlink()
    with pytest.raises(DataError, match="no class list"):
        FolderDataset(tmp_path, "train")
    make_folder(tmp_path)
    save(tmp_path / "masks/train/img0.jpg", np.zeros((20, 28), np.uint8))
    with pytest.raises(DataError, match="JPEG masks .*img0"):
        FolderDataset(tmp_path, "train")


def test_duplicate_stems_are_rejected(tmp_path):
    make_folder(tmp_path)
    save(tmp_path / "images/train/img0.jpg", random_image(np.random.default_rng(0), 20, 28))
    with pytest.raises(DataError, match="same name"):
        FolderDataset(tmp_path, "train")


def test_format_values_and_palette_helpers():
    assert format_values([255, 0, 1, 2, 5]) == "0..2, 5, 255"
    assert format_values([]) == ""
    palette = bit_palette(255)
    assert len({tuple(c) for c in palette.tolist()}) == 255
    assert palette[:3].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0]]
