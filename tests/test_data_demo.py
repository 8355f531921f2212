"""The built-in demo dataset: ADE layout, determinism, atomic generation, colour is not the class."""
import numpy as np
import pytest

from segkit.data import ADE20KDataset, DEMO_CLASSES, DEMO_PALETTE, DemoDataset
from segkit.data import demo
from segkit.errors import DataError

SMALL = {"num_train": 3, "num_val": 2, "image_size": 32}


def files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_demo_is_written_in_ade_layout_and_read_by_the_ade_loader(tmp_path):
    ds = DemoDataset(tmp_path / "demo", "training", **SMALL)
    names = files(tmp_path / "demo")
    assert "demo.json" in names
    assert "ADEChallengeData2016/images/training/DEMO_train_00000001.jpg" in names
    assert "ADEChallengeData2016/annotations/validation/DEMO_val_00000002.png" in names
    assert len(names) == 1 + 2 * (3 + 2)

    assert isinstance(ds, ADE20KDataset) and len(ds) == 3
    assert ds.classes == list(DEMO_CLASSES) and ds.num_classes == 7 and 6 <= len(DEMO_CLASSES) <= 10
    assert np.array_equal(ds.palette, DEMO_PALETTE)
    plain_loader = ADE20KDataset(tmp_path / "demo", "validation", classes=DEMO_CLASSES, palette=DEMO_PALETTE)
    image, mask = plain_loader.load(0)
    assert image.shape == (32, 32, 3) and mask.max() < 7
    assert np.array_equal(ds.encode_prediction(np.array([[0, 6]])), [[0, 6]])  # train ids as they are


def test_same_seed_gives_identical_bytes_other_seed_differs(tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        demo.ensure_demo(tmp_path / name, seed=seed, **SMALL)
    a, b, c = (files(tmp_path / name) for name in "abc")
    assert a == b
    assert a.keys() == c.keys() and a != c


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    def killed(base, split, *args):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "_write_split", killed)
    with pytest.raises(KeyboardInterrupt):
        demo.ensure_demo(tmp_path / "demo", **SMALL)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    assert len(DemoDataset(tmp_path / "demo", "validation", **SMALL)) == 2


def test_existing_root_must_match(tmp_path):
    demo.ensure_demo(tmp_path / "demo", **SMALL)
    with pytest.raises(DataError, match=r"seed=0 \(wanted 3\)"):
        demo.ensure_demo(tmp_path / "demo", seed=3, **SMALL)
    (tmp_path / "other").mkdir()
    with pytest.raises(DataError, match="not a segkit demo dataset"):
        demo.ensure_demo(tmp_path / "other", **SMALL)


def test_pixel_colour_does_not_give_the_class_away():
    """A per-colour majority vote (fit on some scenes, scored on others) stays far from the
    texture/shape information a network can use."""
    def scenes(first, n):
        pairs = [demo.render_scene(np.random.default_rng([0, 0, i]), 64) for i in range(first, first + n)]
        images = np.stack([p[0] for p in pairs]).reshape(-1, 3) // 32  # 8 bins per channel
        return images[:, 0] * 64 + images[:, 1] * 8 + images[:, 2], np.stack([p[1] for p in pairs]).ravel()

    colours, classes = scenes(0, 60)
    counts = np.zeros((512, len(DEMO_CLASSES)))
    np.add.at(counts, (colours, classes), 1)
    colours, classes = scenes(60, 60)
    predicted = counts.argmax(1)[colours]
    ious = [((predicted == c) & (classes == c)).sum() / max(((predicted == c) | (classes == c)).sum(), 1)
            for c in range(len(DEMO_CLASSES))]
    assert np.bincount(classes, minlength=len(DEMO_CLASSES)).min() > 0  # every class occurs
    assert np.mean(ious) < 0.25
