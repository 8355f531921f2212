"""Sample order and augmentation seeds independent of ranks, accumulation and restarts."""
import albumentations as A
import numpy as np
import pytest
import torch

from segkit.training.sampler import IterationBatchSampler, SeededSamples


def _global_batches(n, batch, iters, world, accum, start=0):
    """Micro-batches of every rank, regrouped per iteration in chunk order."""
    per_rank = [list(IterationBatchSampler(n, batch, iters, world, r, accum, seed=3, start_iter=start))
                for r in range(world)]
    steps = []
    for it in range(iters - start):
        chunks = [per_rank[r][it * accum + a] for r in range(world) for a in range(accum)]
        steps.append(chunks)
    return steps


def test_layouts_see_the_same_chunks():
    one = _global_batches(40, 8, 12, world=1, accum=2)
    two = _global_batches(40, 8, 12, world=2, accum=1)
    four = _global_batches(40, 8, 12, world=2, accum=2)
    assert one == two
    assert [sum(s, []) for s in four] == [sum(s, []) for s in one]


def test_epochs_are_permutations_and_resume_continues():
    steps = _global_batches(40, 8, 10, world=1, accum=1)
    epoch0 = [i for s in steps[:5] for (_, i) in s[0]]
    assert sorted(epoch0) == list(range(40)) and {e for s in steps[5:] for (e, _) in s[0]} == {1}
    assert epoch0 != [i for s in steps[5:] for (_, i) in s[0]]  # reshuffled
    assert _global_batches(40, 8, 10, world=1, accum=1, start=7) == steps[7:]


def test_last_incomplete_batch_is_dropped_and_len():
    sampler = IterationBatchSampler(42, 8, 6, world_size=2, rank=1, accum_steps=2)
    assert sampler.iters_per_epoch == 5 and len(sampler) == 12
    assert all(len(b) == 2 for b in sampler)
    with pytest.raises(ValueError):
        IterationBatchSampler(42, 7, 6, world_size=2)


class _Noise(torch.utils.data.Dataset):
    def __init__(self):
        self.transform = A.Compose([A.RandomCrop(4, 4)], strict=True)

    def __len__(self):
        return 3

    def __getitem__(self, i):
        image = np.arange(64 * 3, dtype=np.uint8).reshape(8, 8, 3) + i
        return self.transform(image=image)["image"]


def test_augmentation_depends_only_on_seed_epoch_index():
    a, b = SeededSamples(_Noise(), seed=1), SeededSamples(_Noise(), seed=1)
    b[(0, 2)], b[(5, 1)]  # another history does not matter
    assert np.array_equal(a[(0, 1)], b[(0, 1)])
    crops = {a[(e, 0)].tobytes() for e in range(12)}
    assert len(crops) > 1  # epochs draw new crops
