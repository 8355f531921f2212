"""Colour masks in folder datasets: decoding through the palette, auto detection, clear errors, and
``prepare folder --to-index``, whose index tree loads to exactly the same samples."""
import numpy as np
import pytest
import torch
from PIL import Image

from data_helpers import random_image, save
from hydra.errors import ConfigCompositionException

from config_helpers import dataset_settings, train_settings
from segkit.data import FolderDataset, build_dataset
from segkit.data import prepare
from segkit.data.base import ColorLut, color_codes
from segkit.errors import ConfigError, DataError

PALETTE = [[0, 0, 0], [128, 64, 128], [0, 0, 142]]
IGNORE_COLOR = [255, 255, 255]
CLASSES = ("classes: [background, road, car]\nignore_index: 254\n"
           f"palette: {PALETTE}\nignore_color: {IGNORE_COLOR}\n")
SIZE = (20, 28)


def colorize(index: np.ndarray) -> np.ndarray:
    """Train ids (255 = ignore) -> the RGB mask that encodes them."""
    table = np.zeros((256, 3), np.uint8)
    table[:3] = PALETTE
    table[255] = IGNORE_COLOR
    return table[index]


def make_rgb_folder(root, classes=CLASSES, seed=0):
    """train (3 masks: RGB, RGBA, nested RGB) and val (2 RGB masks); returns the train ids they encode."""
    rng = np.random.default_rng(seed)
    expected = {}
    for split, names in (("train", ["img0", "img1", "sub/img2"]), ("val", ["a", "b"])):
        for i, name in enumerate(names):
            index = rng.integers(0, 3, size=SIZE, dtype=np.uint8)
            index[0, :5] = 255
            rgb = colorize(index)
            if split == "train" and i == 1:
                rgb = np.dstack([rgb, np.full(SIZE, 200, np.uint8)])  # RGBA: alpha is dropped
            save(root / "images" / split / f"{name}.jpg", random_image(rng, *SIZE), quality=90)
            save(root / "masks" / split / f"{name}.png", rgb)
            expected[split, name] = index
    (root / "classes.yaml").write_text(classes)
    return expected


def error_line(capsys) -> str:
    err = capsys.readouterr().err.rstrip("\n").split("\n")
    return err[-1]


def test_rgb_tree_loads_like_its_index_conversion(tmp_path, capsys):
    expected = make_rgb_folder(tmp_path)
    assert prepare.main(["folder", "--root", str(tmp_path), "--to-index", "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "5 index masks for split(s) train, val written to" in out and "dataset.mask_dir=masks_index" in out
    # Ignore is written as the class file's own ignore value (254 here), which loading maps to 255.
    with Image.open(tmp_path / "masks_index/train/img0.png") as written:
        assert written.mode == "L" and 254 in np.array(written)

    for split in ("train", "val"):
        rgb = FolderDataset(tmp_path, split, mask_format="rgb")
        auto = FolderDataset(tmp_path, split, mask_format="auto")
        index = FolderDataset(tmp_path, split, mask_dir="masks_index")
        built = build_dataset(dataset_settings("folder", f"dataset.root={tmp_path}", "dataset.mask_format=index",
                                               "dataset.mask_dir=masks_index"), split)
        names = [rgb.name(i) for i in range(len(rgb))]
        assert names == [index.name(i) for i in range(len(index))] == [built.name(i) for i in range(len(built))]
        assert len(names) == (3 if split == "train" else 2)
        for i, name in enumerate(names):
            image, mask = rgb.load(i)
            for other in (auto, index, built):
                other_image, other_mask = other.load(i)
                assert np.array_equal(image, other_image) and np.array_equal(mask, other_mask)
            assert np.array_equal(mask, expected[split, name])
            x, y = rgb[i]
            assert torch.equal(y, index[i][1]) and torch.equal(x, index[i][0])


def test_unknown_colours_name_the_file_colours_and_pixel_counts(tmp_path):
    expected = make_rgb_folder(tmp_path)
    rgb = colorize(expected["train", "img0"])
    rgb[5, :5] = (1, 2, 3)
    rgb[6, :2] = (9, 9, 9)
    save(tmp_path / "masks/train/img0.png", rgb)
    with pytest.raises(DataError) as err:
        FolderDataset(tmp_path, "train", mask_format="rgb").load(0)
    message = str(err.value)
    assert "masks/train/img0.png: 7 pixel(s) have colours not in the palette of" in message
    assert "classes.yaml: (1, 2, 3) on 5 px, (9, 9, 9) on 2 px;" in message
    assert "dataset.map_out_of_range_to_ignore=true" in message

    mask = FolderDataset(tmp_path, "train", mask_format="rgb", map_out_of_range_to_ignore=True).load(0)[1]
    want = expected["train", "img0"].copy()
    want[5, :5] = want[6, :2] = 255
    assert np.array_equal(mask, want)

    rgb[7, :8] = np.arange(8)[:, None] + 10  # 10 unknown colours: the 5 largest are listed
    save(tmp_path / "masks/train/img0.png", rgb)
    with pytest.raises(DataError, match=r"15 pixel\(s\) .*: \(1, 2, 3\) on 5 px, \(9, 9, 9\) on 2 px, "
                                        r"\(10, 10, 10\) on 1 px, .*, \.\.\. \(10 colours in all\)"):
        FolderDataset(tmp_path, "train", mask_format="auto").load(0)


def test_auto_reads_each_file_by_its_mode(tmp_path):
    expected = make_rgb_folder(tmp_path)
    index = expected["train", "img0"].copy()
    index[index == 255] = 254  # the class file's ignore value in an index mask
    save(tmp_path / "masks/train/img0.png", index)  # mode L next to colour masks
    auto = FolderDataset(tmp_path, "train", mask_format="auto")
    for i, name in enumerate(["img0", "img1", "sub/img2"]):
        assert np.array_equal(auto.load(i)[1], expected["train", name])
    with pytest.raises(DataError, match=r"img1.png: mask has PIL mode RGBA; expected a single-channel .*"
                                        r"dataset.mask_format=rgb or auto"):
        FolderDataset(tmp_path, "train").load(1)  # index is the default
    with pytest.raises(DataError, match=r"img0.png: mask has PIL mode L; colour masks \(mask_format=rgb\)"):
        FolderDataset(tmp_path, "train", mask_format="rgb").load(0)

    # Without a palette, auto still reads index masks and names the class file at a colour mask.
    (tmp_path / "classes.yaml").write_text("classes: [background, road, car]\nignore_index: 254\n")
    auto = FolderDataset(tmp_path, "train", mask_format="auto")
    assert np.array_equal(auto.load(0)[1], expected["train", "img0"])
    with pytest.raises(DataError, match=r"img1.png: colour mask, but .*classes.yaml gives no 'palette'"):
        auto.load(1)


@pytest.mark.parametrize("classes, match", [
    ("classes: [a, b, c]\n", r"classes.yaml: colour masks need 'palette' here"),
    ("classes: [a, b, c]\npalette: [[0, 0, 0], [1, 1, 1], [0, 0, 0]]\n",
     r"classes.yaml: colour \(0, 0, 0\) is given to both class 0 and class 2; colours must be distinct"),
    ("classes: [a, b, c]\npalette: [[0, 0, 0], [1, 1, 1], [2, 2, 2]]\nignore_color: [1, 1, 1]\n",
     r"colour \(1, 1, 1\) is given to both class 1 and ignore_color"),
    ("classes: [a, b, c]\nignore_color: [1, 1]\n", r"'ignore_color' must be an \[R, G, B\] colour"),
])
def test_colour_masks_need_distinct_palette_colours(tmp_path, classes, match):
    make_rgb_folder(tmp_path, classes=classes)
    with pytest.raises(DataError, match=match):
        FolderDataset(tmp_path, "train", mask_format="rgb")


def test_mask_format_config_is_checked(tmp_path):
    make_rgb_folder(tmp_path)
    cfg = ("folder", f"dataset.root={tmp_path}")
    assert build_dataset(dataset_settings(*cfg, "dataset.mask_format=auto"), "train").mask_format == "auto"
    with pytest.raises(ConfigError, match=r"dataset.mask_format='colour' is invalid: expected one of index, rgb, auto"):
        dataset_settings(*cfg, "dataset.mask_format=colour")
    with pytest.raises(ConfigCompositionException, match="dataset.mask_format"):  # the folder dataset's key only
        dataset_settings("ade20k", "dataset.mask_format=rgb")
    with pytest.raises(ValueError, match="mask_format must be one of index, rgb, auto"):
        FolderDataset(tmp_path, "train", mask_format="RGB")


def test_color_lut_maps_every_palette_colour():
    palette = np.random.default_rng(0).integers(0, 256, (255, 3), dtype=np.uint8)
    assert len(np.unique(color_codes(palette))) == 255  # distinct random colours, the most classes
    assert np.array_equal(ColorLut(palette)(palette[None], "x")[0], np.arange(255))


def test_palette_mode_colour_mask_reads_through_its_palette(tmp_path):
    expected = make_rgb_folder(tmp_path)
    index = expected["train", "img0"]
    codes = np.where(index == 255, 3, index).astype(np.uint8)  # P-image entries 0..3
    image = Image.fromarray(codes, mode="P")
    image.putpalette([v for colour in [*PALETTE, IGNORE_COLOR] for v in colour])
    image.save(tmp_path / "masks/train/img0.png")
    assert np.array_equal(FolderDataset(tmp_path, "train", mask_format="rgb").load(0)[1], index)
    # auto (and index) read a P image as indices: entry 3 is not a class of this dataset
    with pytest.raises(DataError, match="mask values 3 are outside the valid values 0..2, 254"):
        FolderDataset(tmp_path, "train", mask_format="auto").load(0)


def test_prepare_to_index_refuses_bad_trees(tmp_path, capsys):
    def run(*extra):
        return prepare.main(["folder", "--root", str(tmp_path), "--to-index", "--workers", "1", *extra])

    assert run() == 2
    assert error_line(capsys) == f"error: {tmp_path / 'masks'} does not exist; expected colour masks in " \
                                 f"{tmp_path / 'masks'}/<split>/"
    expected = make_rgb_folder(tmp_path, classes="classes: [background, road, car]\n")
    assert run() == 2
    assert error_line(capsys).startswith(f"error: {tmp_path / 'classes.yaml'}: colour masks need 'palette'")

    (tmp_path / "classes.yaml").write_text(CLASSES)
    rgb = colorize(expected["val", "b"])
    rgb[0, 0] = (7, 7, 7)
    save(tmp_path / "masks/val/b.png", rgb)
    assert run() == 2
    err = error_line(capsys)
    assert err.startswith("error: 1 of 5 mask(s) could not be converted, e.g. ")
    assert "masks/val/b.png: 1 pixel(s) have colours not in the palette" in err and "(7, 7, 7) on 1 px" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["classes.yaml", "images", "masks"]  # nothing half-written

    assert run("--map-out-of-range-to-ignore") == 0
    converted = FolderDataset(tmp_path, "val", mask_dir="masks_index").load(1)[1]
    assert converted[0, 0] == 255 and np.array_equal(converted[1:], expected["val", "b"][1:])
    before = (tmp_path / "masks_index/val/b.png").read_bytes()
    assert run() == 2  # an existing destination is never overwritten
    assert "masks_index already exists; delete it to convert again" in error_line(capsys)
    assert (tmp_path / "masks_index/val/b.png").read_bytes() == before
    assert run("--out", str(tmp_path / "masks" / "index")) == 2
    assert "is inside" in error_line(capsys)


def test_rgb_tree_trains_and_evaluates_like_its_index_conversion(tmp_path, monkeypatch):
    """Two iterations on the colour masks and on their index conversion: the same weights and the
    same validation numbers."""
    import torch

    from segkit.training.trainer import train

    make_rgb_folder(tmp_path / "data")
    assert prepare.main(["folder", "--root", str(tmp_path / "data"), "--to-index", "--workers", "1"]) == 0
    torch.set_num_threads(1)
    common = ("folder", f"dataset.root={tmp_path / 'data'}", "dataset.base_size=24", "dataset.crop_size=24",
              "backbone=resnest14", "backbone.pretrained=null", "model.channels=8", "model.aspp_dropout=0",
              "model.dropout=0", "model.aux_dropout=0", "train.batch_size=3", "train.workers=0", "train.iters=2",
              "train.val_every=2", "train.progress=false", "train.val_images=0")
    summaries, weights = [], []
    for name, masks in (("rgb", ("dataset.mask_format=rgb",)),
                        ("index", ("dataset.mask_dir=masks_index", "dataset.mask_format=index"))):
        summaries.append(train(train_settings(*[f"dataset={common[0]}", *common[1:], *masks]), tmp_path / name))
        weights.append(torch.load(tmp_path / name / "last.pt", weights_only=True)["model"])
    assert summaries[0] == summaries[1]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
