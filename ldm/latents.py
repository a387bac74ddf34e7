"""The latent cache: what `encode-dataset` writes and `train-ldm` reads instead of pixels.

`run/latents/` holds safetensors shards, each with the VAE posterior's `mean` and `std` (N, C, h, w)
for a fixed range of images, their `row` in the dataset listing, `label`, `holdout` flag and
`captions` (N, K) caption indices (-1 padded), plus `manifest.json`: the fingerprints of the VAE
weights and of the dataset (listing + preprocessing), the caption strings and per-channel latent
statistics. Storing mean and std rather than one sample lets training draw a fresh latent sample
every step (as EDM2 does).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from common.checkpoint import load_tensors
from common.errors import UserError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class StaleCacheError(UserError):
    """The latent cache was made with another VAE or another version of the dataset."""


def file_fingerprint(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def vae_fingerprint(vae_folder: Path) -> str:
    """Hash of the VAE's weights and config (so a retrained VAE invalidates the cache)."""
    weights = sorted(vae_folder.glob("*.safetensors"))
    if not weights:
        raise UserError(f"no VAE weights in {vae_folder}; run `train-vae --config ...` first")
    h = hashlib.sha256()
    for path in weights + [vae_folder / "config.json"]:
        h.update(file_fingerprint(path).encode())
    return h.hexdigest()


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


@dataclass
class LatentCache:
    """All cached latents in memory: (N, C, h, w) mean/std, (N,) labels/holdout, (N, K) caption ids."""

    mean: torch.Tensor
    std: torch.Tensor
    labels: torch.Tensor
    holdout: torch.Tensor
    captions_per_image: torch.Tensor
    captions: list[str]
    manifest: dict

    @property
    def num_captions(self) -> torch.Tensor:  # (N,) how many captions each image has
        return (self.captions_per_image >= 0).sum(1)

    def split(self, holdout: bool) -> "LatentCache":
        keep = self.holdout == holdout
        return LatentCache(self.mean[keep], self.std[keep], self.labels[keep], self.holdout[keep],
                           self.captions_per_image[keep], self.captions, self.manifest)

    def __len__(self) -> int:
        return len(self.mean)


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
    parts: dict[str, list[torch.Tensor]] = {}
    for shard in manifest["shards"]:
        tensors, meta = load_tensors(folder / shard["file"])
        if not meta or meta.get("key") != manifest["key"]:
            raise StaleCacheError(f"{shard['file']} in {folder} belongs to another cache; re-run `encode-dataset`")
        for name, value in tensors.items():
            parts.setdefault(name, []).append(value)
    data = {name: torch.cat(values) for name, values in parts.items()}
    order = data["row"].argsort()  # shard order = listing order, whatever process wrote which shard
    return LatentCache(data["mean"][order].float(), data["std"][order].float(), data["label"][order].long(),
                       data["holdout"][order].bool(), data["captions"][order].long(), manifest["captions"], manifest)
