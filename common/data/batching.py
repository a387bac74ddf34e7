"""Batches: a deterministic, resumable stream of epochs for training, the pixels a training step reads, and plain
ordered batches."""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch

from common.data.pixels import from_uint8
from common.devices import fits_on
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
            # made on the host by name (a CPU generator: the same order on every device), not on torch's default
            # device, which a caller may have set to the GPU; then copied over once per epoch, from pinned memory:
            # torch copies pageable memory to a GPU and then waits for the stream (every kernel queued so far), and
            # where a batch is most of the data (configs/mnist-gpu.yaml) a new epoch starts nearly every step
            order = torch.randperm(self.size, generator=generator, device="cpu")
            if torch.device(device).type == "cuda":
                order = order.pin_memory()
            self._permutations[key] = order.to(device, non_blocking=True)
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


class TrainingImages:
    """The training images of a stage that trains on pixels (`train-vae`, `train-clip`), batch by batch.

    When they fit in a quarter of the device's free memory (every built-in dataset, and folders of a few
    hundred thousand small images on a GPU), all of them are read once into one (N, C, H, W) uint8 tensor on
    the device, and a step gathers its rows there: no Python per image, no copy from the host, nothing that
    waits for the device. Otherwise a DataLoader reads a step's files (`data.num_workers` processes) into
    pinned memory and copies them over without blocking. Both give the same pixels for the same step.
    """

    def __init__(self, dataset: "torch.utils.data.Dataset", sampler: StepBatches, device: torch.device,
                 num_workers: int = 0):
        self.sampler, self.device = sampler, torch.device(device)
        first = np.asarray(dataset.pixels(0))  # (H, W, C) uint8: every image has the configured size
        self.nbytes = len(dataset) * first.nbytes
        self.resident: torch.Tensor | None = None  # (N, C, H, W) uint8 on the device
        if fits_on(self.device, self.nbytes):
            loader = torch.utils.data.DataLoader(_Pixels(dataset), batch_size=256, num_workers=num_workers)
            # NCHW strides even for one channel (where .contiguous() would keep the permuted ones): the DataLoader's
            # batches have them, and convolutions pick their kernels (and so their last bits) by the strides
            images = torch.cat(list(loader)).permute(0, 3, 1, 2).clone(memory_format=torch.contiguous_format)
            self.resident = images.to(self.device)
        else:
            self._batches = iter(torch.utils.data.DataLoader(
                dataset, batch_sampler=sampler, num_workers=num_workers, persistent_workers=num_workers > 0,
                pin_memory=self.device.type == "cuda"))

    def describe(self) -> str:
        size = f"{self.nbytes / 2**20:.3g} MB"
        return f"held on {self.device} ({size})" if self.resident is not None else f"read from disk each step ({size})"

    def batch(self, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Micro-batch `micro` of step `step` (called in step order): the images (B, C, H, W) float32 in [-1, 1]
        and their rows in the dataset (B,) int64, both on the device."""
        if self.resident is not None:
            rows = self.sampler.index_tensor(step, micro, self.device)
            return from_uint8(self.resident[rows]), rows  # as pixels.to_tensor does, bit for bit
        batch = next(self._batches)  # the DataLoader's sampler yields the same steps in the same order
        return (batch["pixel_values"].to(self.device, non_blocking=True),
                batch["index"].to(self.device, non_blocking=True))


class _Pixels(torch.utils.data.Dataset):
    """A dataset's images as (H, W, C) uint8 tensors: what `TrainingImages` loads once, with worker processes."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.dataset.pixels(i), copy=True))


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
                  indices: list[int] | None = None, num_workers: int = 0,
                  device: torch.device | None = None) -> Iterator[dict]:
    """The dataset's images in order (or `indices`), un-augmented, in batches; with `device`, each batch's tensors
    on it (read into pinned memory for a GPU, so that the copy does not wait for the work queued there)."""
    if indices is None:
        indices = list(range(len(dataset) if limit is None else min(limit, len(dataset))))
    pin = device is not None and device.type == "cuda"
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=batch_size,
                                         shuffle=False, num_workers=num_workers, pin_memory=pin)
    for batch in loader:
        yield batch if device is None else {k: v.to(device, non_blocking=pin) if torch.is_tensor(v) else v
                                            for k, v in batch.items()}
