"""Training sample order that depends only on (seed, iteration), never on the process layout.

Each iteration takes the next ``batch_size`` indices of a per-epoch permutation and splits them
into ``world_size x accum_steps`` equal micro-batches; rank r, micro-step a gets chunk
``r * accum_steps + a``. One process accumulating two micro-batches therefore sees exactly the
samples that two DDP ranks see, and a resumed run picks up at the next iteration. Augmentations are
seeded per sample from (seed, epoch, index), so they do not depend on workers or restarts either.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


class IterationBatchSampler(Sampler[list[tuple[int, int]]]):
    """Yields this rank's micro-batches of ``(epoch, index)`` keys for iterations ``[start, total)``."""

    def __init__(self, num_samples: int, batch_size: int, total_iters: int, world_size: int = 1,
                 rank: int = 0, accum_steps: int = 1, seed: int = 0, start_iter: int = 0) -> None:
        if batch_size % (world_size * accum_steps):
            raise ValueError("batch_size must divide by world_size * accum_steps")
        self.iters_per_epoch = num_samples // batch_size  # drop the last incomplete batch, as the original
        if self.iters_per_epoch == 0:
            raise ValueError(f"batch_size {batch_size} exceeds the {num_samples} training samples")
        self.batch_size, self.total_iters, self.start_iter = batch_size, total_iters, start_iter
        self.num_samples, self.seed, self.accum_steps = num_samples, seed, accum_steps
        self.micro = batch_size // (world_size * accum_steps)
        self.first_chunk = rank * accum_steps

    def permutation(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.num_samples, generator=g).tolist()

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, order = -1, []
        for it in range(self.start_iter, self.total_iters):
            e, k = divmod(it, self.iters_per_epoch)
            if e != epoch:
                epoch, order = e, self.permutation(e)
            batch = order[k * self.batch_size:(k + 1) * self.batch_size]
            for a in range(self.accum_steps):
                c = (self.first_chunk + a) * self.micro
                yield [(epoch, i) for i in batch[c:c + self.micro]]

    def __len__(self) -> int:
        return (self.total_iters - self.start_iter) * self.accum_steps


class SeededSamples(Dataset):
    """Wraps a dataset whose ``transform`` is an albumentations Compose; item ``(epoch, i)`` is
    sample ``i`` augmented with a seed derived from (run seed, epoch, i)."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        sample_seed = int(np.random.SeedSequence([self.seed, epoch, index]).generate_state(1)[0])
        self.dataset.transform.set_random_seed(sample_seed)
        return self.dataset[index]
