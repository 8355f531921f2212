"""conf/dataset/*.yaml compose with Hydra and drive build_dataset."""
from dataclasses import replace

import numpy as np
import pytest

from config_helpers import dataset_settings
from data_helpers import make_folder
from segkit.settings import as_dict
from segkit.data import DATASETS, DemoDataset, build_dataset
from segkit.errors import ConfigError

KEYS = {"name", "root", "num_classes", "base_size", "crop_size", "scale_range", "mean",
        "std", "eval_scales", "miou_convention", "epochs", "train_split", "val_split", "jitter",
        "map_out_of_range_to_ignore"}


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_every_dataset_config_composes(name, monkeypatch):
    monkeypatch.setenv("SEGKIT_DATA", "/datasets")
    cfg = dataset_settings(name)
    assert KEYS <= set(as_dict(cfg)) and cfg.name == name and cfg.jitter is False
    assert cfg.root == f"/datasets/{name}"
    assert cfg.miou_convention in ("all", "present")
    assert dataset_settings(name, "dataset.root=/elsewhere").root == "/elsewhere"
    monkeypatch.delenv("SEGKIT_DATA")
    assert dataset_settings(name).root == f"./data/{name}"


def test_paper_settings():
    ade, cityscapes, demo, context = (dataset_settings(n) for n in ("ade20k", "cityscapes", "demo", "pascal_context"))
    assert ade.eval_scales == context.eval_scales == [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]
    assert cityscapes.eval_scales == [0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.25]
    assert (ade.epochs, cityscapes.epochs, context.epochs) == (120, 240, 80)
    assert (ade.miou_convention, cityscapes.miou_convention, demo.miou_convention) == ("all", "present", "present")
    assert context.miou_convention == "all"
    assert (ade.num_classes, cityscapes.num_classes, demo.num_classes, context.num_classes) == (150, 19, 7, 59)
    assert (ade.base_size, ade.crop_size, cityscapes.base_size, cityscapes.crop_size) == (520, 480, 1024, 768)
    assert (context.base_size, context.crop_size) == (520, 480)


def test_build_demo_from_composed_config(tmp_path):
    cfg = dataset_settings("demo", f"dataset.root={tmp_path / 'demo'}", "dataset.num_train=2",
                           "dataset.num_val=1", "dataset.image_size=32")
    train, val = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    assert isinstance(train, DemoDataset) and (train.split, len(train)) == ("training", 2)
    assert (val.split, len(val)) == ("validation", 1)
    assert build_dataset(cfg, "validation").split == "validation"
    x, y = val[0]
    assert x.shape == (3, 32, 32) and y.shape == (32, 32)


def test_build_folder(tmp_path):
    make_folder(tmp_path)
    cfg = dataset_settings("folder", f"dataset.root={tmp_path}")
    ds = build_dataset(cfg, "val")
    assert ds.classes == ["sky", "road", "car"] and ds.split == "val"
    (tmp_path / "images/test").mkdir()
    (tmp_path / "images/test/a.png").write_bytes((tmp_path / "images/val/img0.png").read_bytes())
    assert build_dataset(cfg, "test").load(0)[1] is None  # other splits may be unlabelled
    with pytest.raises(ConfigError, match="num_classes=5 but .* has 3 classes"):
        build_dataset(replace(cfg, num_classes=5), "train")


def test_unknown_dataset_name_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="choose one of ade20k, cityscapes, pascal_context, folder, demo"):
        build_dataset(replace(dataset_settings("ade20k"), name="pascal"), "train")


def test_config_mean_std_reach_the_dataset(tmp_path):
    make_folder(tmp_path)
    ds = build_dataset(dataset_settings("folder", f"dataset.root={tmp_path}", "dataset.mean=[0,0,0]",
                                        "dataset.std=[1,1,1]"), "train")
    image, _ = ds.load(0)
    assert np.allclose(ds[0][0].permute(1, 2, 0).numpy(), image / 255.0, atol=1e-6)
