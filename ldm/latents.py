"""The latent cache: what `encode-dataset` writes and `train-ldm` reads instead of pixels.

`run/latents/` holds safetensors shards, each with the VAE posterior's `mean` and `std` (N, C, h, w)
for a fixed range of images, their `row` in the dataset listing, `label`, `holdout` flag and
`captions` (N, K) caption indices (-1 padded), plus `manifest.json`: the fingerprints of the VAE
weights and of the dataset (listing + preprocessing), the caption strings and the class table. Storing mean and std rather than one sample lets training draw a fresh latent sample
every step (as EDM2 does).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from common.checkpoint import DamagedFileError, check_safetensors, decode_metadata, folder_fingerprint
from common.errors import UserError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class StaleCacheError(UserError):
    """The latent cache was made with another VAE or another version of the dataset."""


def vae_fingerprint(vae_folder: Path) -> str:
    """Hash of the VAE's weights and config (so a retrained VAE invalidates the cache)."""
    if not sorted(Path(vae_folder).glob("*.safetensors")):
        raise UserError(f"no VAE weights in {vae_folder}; run `train-vae --config ...` first")
    return folder_fingerprint(vae_folder)


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
                      "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def memory_map(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """Map a safetensors file's tensors as read-only numpy arrays, without reading them into memory.

    The format is an 8-byte header length, a JSON header (dtype, shape, byte offsets per tensor), then
    the raw little-endian data; pages are read from disk (and the page cache) only when rows are used.
    """
    header_size, header = check_safetensors(path, "encode-dataset")  # a cut-short shard would map past its end
    metadata = header.pop("__metadata__", None)
    arrays = {}
    for name, info in header.items():
        shape = tuple(info["shape"])
        begin = info["data_offsets"][0]
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        arrays[name] = (np.memmap(path, dtype=dtype, mode="r", offset=8 + header_size + begin, shape=shape)
                        if math.prod(shape) else np.zeros(shape, dtype))
    return arrays, decode_metadata(metadata) or {}


def shard_key(path: Path) -> str | None:
    """The cache key a whole shard was written under; None when it is missing or damaged (to encode again)."""
    try:
        _, header = check_safetensors(path, "encode-dataset")
        return (decode_metadata(header.get("__metadata__")) or {}).get("key")
    except (DamagedFileError, ValueError, AttributeError):  # a damaged file, or metadata that is not ours
        return None


@dataclass
class LatentCache:
    """The cached latents, memory-mapped shard by shard so a cache larger than memory still trains.

    Per image, in dataset-listing order: `labels` (N,), `holdout` (N,), `captions_per_image` (N, K)
    (caption indices, -1 padded) are held in memory; `latents(items)` reads the posterior mean and
    std of just those images: (B, C, h, w) each. `to_device` makes a copy whose latents and captions
    live on the training device (what `train-ldm` uses when they fit), so a step reads nothing from disk.
    """

    shards: list[dict[str, np.ndarray]]
    shard_of: np.ndarray  # (N,) the shard each image is in
    row_in_shard: np.ndarray  # (N,) its row there
    labels: torch.Tensor
    holdout: torch.Tensor
    captions_per_image: torch.Tensor
    captions: list[str]
    manifest: dict
    resident: tuple[torch.Tensor, torch.Tensor] | None = None  # (mean, std) (N, C, h, w) on a device

    @cached_property  # read at every training step: counted once, not over every image each step
    def num_captions(self) -> torch.Tensor:  # (N,) how many captions each image has
        return (self.captions_per_image >= 0).sum(1)

    @property
    def nbytes(self) -> int:
        """Bytes of the mean and std of every image: what `to_device` would hold."""
        return 2 * len(self) * math.prod(self.latent_shape) * 4

    def to_device(self, device: torch.device) -> "LatentCache":
        """A copy with every latent, label and caption index on `device`, read from the shards once."""
        mean, std = self.latents(np.arange(len(self)))
        return LatentCache(self.shards, self.shard_of, self.row_in_shard, self.labels.to(device),
                           self.holdout.to(device), self.captions_per_image.to(device), self.captions,
                           self.manifest, (mean.to(device), std.to(device)))

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.shards[0]["mean"].shape[1:])

    def latents(self, items: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and std of the images `items` (indices into this cache): (B, C, h, w) float32 each."""
        if self.resident is not None:
            items = torch.as_tensor(items, device=self.resident[0].device)
            return self.resident[0][items], self.resident[1][items]
        items = np.asarray(items)
        mean = np.empty((len(items), *self.latent_shape), np.float32)
        std = np.empty_like(mean)
        shards = self.shard_of[items]
        for shard in np.unique(shards):
            where = np.flatnonzero(shards == shard)
            rows = self.row_in_shard[items[where]]
            order = np.argsort(rows)  # ascending reads are kinder to the disk
            mean[where[order]] = self.shards[shard]["mean"][rows[order]]
            std[where[order]] = self.shards[shard]["std"][rows[order]]
        return torch.from_numpy(mean), torch.from_numpy(std)

    def split(self, holdout: bool) -> "LatentCache":
        if self.resident is not None:
            raise ValueError("split the memory-mapped cache first, then move the part you train on with to_device")
        keep = (self.holdout == holdout).numpy()
        return LatentCache(self.shards, self.shard_of[keep], self.row_in_shard[keep], self.labels[keep],
                           self.holdout[keep], self.captions_per_image[keep], self.captions, self.manifest)

    def __len__(self) -> int:
        return len(self.labels)


def read_manifest(folder: Path) -> dict | None:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None


def check_current(manifest: dict | None, folder: Path, vae_hash: str, dataset_hash: str) -> None:
    """Refuse a missing, partial or stale cache with the command that fixes it."""
    if manifest is None or not manifest.get("complete"):
        raise StaleCacheError(f"no complete latent cache in {folder}; run `encode-dataset --config ...` first")
    if manifest.get("format") != FORMAT_VERSION:
        raise StaleCacheError(f"the latent cache in {folder} has an old format; re-run `encode-dataset --config ...`")
    if manifest["vae"] != vae_hash:
        raise StaleCacheError(f"the latent cache in {folder} was made with a different VAE (the VAE was retrained "
                              f"since); re-run `encode-dataset --config ...`")
    if manifest["dataset"] != dataset_hash:
        raise StaleCacheError(f"the latent cache in {folder} was made from a different dataset or preprocessing "
                              f"(images, captions or data.* settings changed); re-run `encode-dataset --config ...`")


def load_cache(folder: Path, vae_hash: str, dataset_hash: str) -> LatentCache:
    manifest = read_manifest(folder)
    check_current(manifest, folder, vae_hash, dataset_hash)
    shards, columns = [], {}
    for number, shard in enumerate(manifest["shards"]):
        arrays, meta = memory_map(folder / shard["file"])
        if meta.get("key") != manifest["key"]:
            raise StaleCacheError(f"{shard['file']} in {folder} belongs to another cache; re-run `encode-dataset`")
        shards.append(arrays)
        rows = len(arrays["row"])
        for name, values in [("shard", np.full(rows, number)), ("local", np.arange(rows)), ("row", arrays["row"]),
                             ("label", arrays["label"]), ("holdout", arrays["holdout"]), ("captions", arrays["captions"])]:
            columns.setdefault(name, []).append(np.asarray(values))
    data = {name: np.concatenate(values) for name, values in columns.items()}
    order = np.argsort(data["row"])  # listing order, whichever process wrote which shard
    return LatentCache(shards, data["shard"][order], data["local"][order], torch.from_numpy(data["label"][order]).long(),
                       torch.from_numpy(data["holdout"][order]).bool(), torch.from_numpy(data["captions"][order]).long(),
                       manifest["captions"], manifest)
