"""Batches: a deterministic, resumable stream of epochs for training, and plain ordered batches."""

from __future__ import annotations

import math
from typing import Iterator

import torch

from common.seeding import seed_from


class StepBatches(torch.utils.data.Sampler):
    """Index batches for optimizer steps `start_step, start_step + 1, ...`.

    The data is one endless stream of epochs, each a fresh permutation drawn from (seed, epoch). The
    micro-batch `m` of step `s` on rank `r` takes the `batch_size` stream positions starting at
    ((s * accum + m) * world + r) * batch_size. So every rank sees different images, and the
    batches of a step do not depend on the worker count or on where a run was resumed.
    """

    def __init__(self, size: int, batch_size: int, seed: int, start_step: int = 0, rank: int = 0,
                 world_size: int = 1, grad_accum: int = 1):
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.start_step, self.rank, self.world_size, self.grad_accum = start_step, rank, world_size, grad_accum
        self._permutations: dict[tuple[int, str], torch.Tensor] = {}

    def permutation(self, epoch: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Epoch `epoch`'s order of the `size` items, on `device` (moved there once per epoch)."""
        key = (epoch, str(device))
        if key not in self._permutations:
            generator = torch.Generator().manual_seed(seed_from(self.seed, "epoch", epoch))
            # keep this epoch and the one before: a batch may straddle the boundary
            self._permutations = {k: p for k, p in self._permutations.items() if k[0] == epoch - 1}
            self._permutations[key] = torch.randperm(self.size, generator=generator).to(device)
        return self._permutations[key]

    def index_tensor(self, step: int, micro: int = 0, device: torch.device | str = "cpu") -> torch.Tensor:
        """The items of micro-batch `micro` of step `step` on this rank: (batch_size,) int64 on `device`."""
        position = ((step * self.grad_accum + micro) * self.world_size + self.rank) * self.batch_size
        end, pieces = position + self.batch_size, []
        while position < end:
            epoch, offset = divmod(position, self.size)
            take = min(end - position, self.size - offset)
            pieces.append(self.permutation(epoch, device)[offset:offset + take])
            position += take
        return torch.cat(pieces)

    def indices(self, step: int, micro: int = 0) -> list[int]:
        return self.index_tensor(step, micro).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while True:
            for micro in range(self.grad_accum):
                yield self.indices(step, micro)
            step += 1

    def __len__(self) -> int:  # endless; DataLoader only needs this for len(loader)
        return 2**62


def steps_for(config_max_steps: int, epochs: float, size: int, global_batch: int) -> int:
    """The step budget: `max_steps`, or fewer when `epochs` is set and reached first."""
    if epochs > 0:
        return min(config_max_steps, math.ceil(epochs * size / global_batch))
    return config_max_steps


def spread_indices(length: int, count: int) -> list[int]:
    """`count` indices spread evenly over range(length): a sample of every class of a class-ordered
    dataset, not the first few classes."""
    return torch.linspace(0, length - 1, min(count, length)).round().long().unique().tolist()


def image_batches(dataset: torch.utils.data.Dataset, batch_size: int, limit: int | None = None,
                  indices: list[int] | None = None, num_workers: int = 0) -> Iterator[dict]:
    """The dataset's images in order (or `indices`), un-augmented, in batches."""
    if indices is None:
        indices = list(range(len(dataset) if limit is None else min(limit, len(dataset))))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=batch_size,
                                         shuffle=False, num_workers=num_workers)
    yield from loader
