"""Augmentation recipe: image/mask alignment, ignore padding, reproducibility."""
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from data_helpers import save
from segkit.data import FolderDataset, build_train_transform
from segkit.data.preprocess import Preprocess
from segkit.data.transforms import normalize_transform

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])
COLOURS = np.array([[200, 30, 30], [30, 200, 30], [30, 30, 200], [220, 220, 40], [40, 220, 220]], np.uint8)
CFG = {"base_size": 48, "crop_size": 40, "preprocess": Preprocess(tuple(MEAN), tuple(STD))}


def block_scene(h=36, w=48, block=12, seed=0):
    """Mask of random class blocks and an image whose colours are the classes (no black pixels)."""
    rng = np.random.default_rng(seed)
    mask = rng.integers(0, len(COLOURS), size=(h // block + 1, w // block + 1)).repeat(block, 0).repeat(block, 1)
    mask = mask[:h, :w].astype(np.uint8)
    return COLOURS[mask], mask


def denormalise(x: torch.Tensor) -> np.ndarray:
    return (x.permute(1, 2, 0).numpy() * STD + MEAN) * 255


def nearest_class(image: np.ndarray) -> np.ndarray:
    return np.linalg.norm(image[:, :, None, :] - COLOURS[None, None].astype(float), axis=-1).argmin(-1)


def interior(mask: np.ndarray, r: int = 1) -> np.ndarray:
    """Pixels whose (2r+1)^2 neighbourhood holds a single mask value, away from the crop border."""
    padded = np.pad(mask.astype(int), r, constant_values=-1)
    windows = np.lib.stride_tricks.sliding_window_view(padded, (2 * r + 1,) * 2)
    return (windows == mask[..., None, None]).all(axis=(-1, -2))


def test_train_transform_keeps_image_and_mask_aligned():
    image, mask = block_scene()
    transform = build_train_transform(**CFG, seed=0)
    for _ in range(30):
        out = transform(image=image, mask=mask)
        x, y = out["image"], out["mask"].numpy()
        assert x.shape == (3, 40, 40) and x.dtype == torch.float32 and y.shape == (40, 40)
        labelled = (y != 255) & interior(y)
        assert labelled.sum() > 50
        assert np.array_equal(nearest_class(denormalise(x))[labelled], y[labelled])


def test_padding_is_bottom_right_with_ignore_mask_and_black_image():
    image, mask = block_scene(20, 24)  # long side 24..96 when scaled; often below the 40 crop
    transform = build_train_transform(**{**CFG, "base_size": 24}, seed=1)
    padded = 0
    for _ in range(30):
        out = transform(image=image, mask=mask)
        x, y = denormalise(out["image"]), out["mask"].numpy()
        ignore = y == 255
        if ignore.any():
            padded += 1
            rows, cols = ignore.all(1), ignore.all(0)
            # Ignore covers whole trailing rows/columns only: padding went to the bottom/right.
            assert np.array_equal(ignore, rows[:, None] | cols[None, :])
            assert not rows[0] and not cols[0]
            assert np.abs(x[ignore]).max() < 1e-3  # image filled with 0 before normalisation
            assert (x[~ignore].max(-1) > 20).all()
    assert padded > 5


def test_scale_range_follows_base_size():
    image, mask = block_scene(40, 80)
    sizes = set()
    resize = build_train_transform(**{**CFG, "base_size": 40}, seed=2).transforms[1]
    for _ in range(100):
        sizes.add(max(resize(image=image, mask=mask)["image"].shape[:2]))
    assert min(sizes) >= 20 and max(sizes) <= 80 and len(sizes) > 20


def test_normalize_transform_keeps_full_image():
    image, mask = block_scene(37, 53)
    out = normalize_transform(CFG["preprocess"])(image=image, mask=mask)
    assert out["image"].shape == (3, 37, 53)
    assert np.array_equal(out["mask"].numpy(), mask)
    assert np.allclose(denormalise(out["image"]), image, atol=1e-3)


def test_jitter_flag_and_bad_arguments():
    names = [type(t).__name__ for t in build_train_transform(**CFG, jitter=True).transforms]
    assert "ColorJitter" in names
    assert "ColorJitter" not in [type(t).__name__ for t in build_train_transform(**CFG).transforms]
    with pytest.raises(ValueError, match="crop_size"):
        build_train_transform(base_size=10, crop_size=0)
    with pytest.raises(ValueError, match="scale_range"):
        build_train_transform(**CFG, scale_range=[2.0, 1.0])
    with pytest.raises(ValueError, match="mean"):
        Preprocess((0.5, 0.5), (1, 1, 1))


@pytest.fixture
def same_image_dataset(tmp_path):
    """Four copies of one scene, so any difference between items comes from augmentation."""
    image, mask = block_scene()
    for i in range(4):
        save(tmp_path / f"images/train/{i}.png", image)
        save(tmp_path / f"masks/train/{i}.png", mask)
    (tmp_path / "classes.yaml").write_text("classes: [a, b, c, d, e]\n")
    return FolderDataset(tmp_path, "train", transform=build_train_transform(**CFG, seed=0))


def _epoch(dataset, seed, num_workers=0):
    loader = DataLoader(dataset, batch_size=1, num_workers=num_workers, generator=torch.Generator().manual_seed(seed))
    return [y[0].numpy() for _, y in loader]


def test_main_process_reproduces_from_transform_seed(same_image_dataset):
    first = _epoch(same_image_dataset, seed=0, num_workers=0)
    same_image_dataset.transform = build_train_transform(**CFG, seed=0)
    again = _epoch(same_image_dataset, seed=0, num_workers=0)
    same_image_dataset.transform = build_train_transform(**CFG, seed=1)
    other = _epoch(same_image_dataset, seed=0, num_workers=0)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))
