"""encode-dataset: encode every image once with the trained VAE and cache the latents in `run/latents/`.

    encode-dataset --config configs/mnist.yaml

Stores the posterior's mean and std of every image (training and held-out, flagged) in safetensors
shards of `encode.shard_size` images, written one at a time so memory does not grow with the
dataset. A manifest fingerprints the VAE weights and the dataset; re-running with a current cache
does nothing, and an interrupted run keeps its finished shards and resumes after them. On N
processes (`accelerate launch`), shard k is encoded by rank k mod N; the result is the same.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from contextlib import nullcontext

import torch
from tqdm.auto import tqdm

from common.checkpoint import remove_leftovers, save_tensors, writable_folder, write_text
from common.cli import run_cli
from common.config import Config, dump_config
from common.data import image_batches, load_split
from common.data.captions import caption_table
from common.loop import StopSignals, TrainingInterrupted
from common.run import RunFolder, RunLock
from common.devices import process_state
from ldm.latents import FORMAT_VERSION, MANIFEST, read_manifest, shard_key, shard_name, vae_fingerprint
from vae.model import load_vae


def main(config: Config, args: argparse.Namespace | None = None) -> dict:
    # inference only: no Accelerator, no mixed precision (the VAE encodes in fp32: fp16 VAEs overflow)
    state = process_state()
    run = RunFolder(writable_folder(config.run_dir, "run_dir"))
    run.check_shared_settings(config, "encode")
    run.check_writable("encode", run.latents)
    state.print(dump_config(config))
    with RunLock(run.root, "encode") if state.is_main_process else nullcontext():
        return encode(config, state, run)


def encode(config: Config, state, run: RunFolder) -> dict:
    """Encode the shards this process owns, then (main process) write the manifest."""
    device, rank, world = state.device, state.process_index, state.num_processes
    if state.is_main_process:  # under the lock: shards and manifests of a process killed mid-write
        remove_leftovers(run.latents, "*")
    state.wait_for_everyone()  # before any rank writes a shard
    run.check_finished("vae", "vae")
    vae = load_vae(run.component("vae")).to(device)
    dataset = load_split(config.data, "all")
    vae_hash, dataset_hash = vae_fingerprint(run.component("vae")), dataset.fingerprint()
    key = hashlib.sha256(f"{vae_hash}|{dataset_hash}|{config.encode.shard_size}|{FORMAT_VERSION}".encode()).hexdigest()
    manifest = read_manifest(run.latents)
    if manifest and manifest.get("complete") and manifest.get("key") == key:
        damaged = [shard["file"] for shard in manifest["shards"] if shard_key(run.latents / shard["file"]) != key]
        if not damaged:
            state.print(f"[encode] the latent cache in {run.latents} is current ({manifest['num_images']} images); "
                        f"nothing to do")
            return manifest
        state.print(f"[encode] {', '.join(damaged)} in {run.latents} {'is' if len(damaged) == 1 else 'are'} missing "
                    f"or damaged; encoding {'it' if len(damaged) == 1 else 'them'} again")

    if state.is_main_process:  # the inputs are checked: now the run folder may change
        for note in run.save_config(config, "encode"):
            state.print(f"[encode] {note}")
    size = config.encode.shard_size
    num_shards = math.ceil(len(dataset) / size)
    mine = [k for k in range(num_shards) if k % world == rank]
    todo = [k for k in mine if not _shard_done(run, k, key)]
    images = sum(min(size, len(dataset) - k * size) for k in todo)
    state.print(f"[encode] {len(dataset)} images -> {num_shards} shard(s) of up to {size}; "
                      f"{len(mine) - len(todo)} of this process's {len(mine)} already done")
    max_captions = max(len(ids) for ids in dataset.caption_ids)
    progress = tqdm(total=images, desc="encode", unit="img", disable=not state.is_local_main_process)
    started = time.time()
    with StopSignals() as signals, torch.no_grad():
        for k in todo:
            rows = list(range(k * size, min(len(dataset), (k + 1) * size)))
            means, stds = [], []
            # a shard's latents stay on the device until it is written: one copy to the host per shard, so the
            # next batch is read from disk (into pinned memory) while the device still encodes this one
            for batch in image_batches(dataset, config.encode.batch_size, indices=rows,
                                       num_workers=config.data.num_workers, device=device):
                posterior = vae.encode(batch["pixel_values"]).latent_dist
                means.append(posterior.mean)
                stds.append(posterior.std)
                progress.update(len(batch["pixel_values"]))
                if signals.received is not None:
                    progress.close()
                    print("[encode] interrupted; finished shards are kept. Re-run the same command to resume.")
                    raise TrainingInterrupted(128 + signals.received)
            captions = caption_table([dataset.caption_ids[row] for row in rows], max_captions).to(torch.int32)
            save_tensors(run.latents / shard_name(k), {
                "mean": torch.cat(means).cpu(), "std": torch.cat(stds).cpu(), "row": torch.tensor(rows),
                "label": torch.tensor([dataset.labels[r] for r in rows]),
                "holdout": torch.tensor([dataset.holdout[r] for r in rows], dtype=torch.uint8),
                "captions": captions}, {"key": key, "shard": k})
    progress.close()
    seconds = time.time() - started
    state.wait_for_everyone()
    manifest = {}
    if state.is_main_process:
        manifest = _write_manifest(run, dataset, key, vae_hash, dataset_hash, num_shards)
        manifest["images_per_second"] = images * world / max(seconds, 1e-9)
        state.print(f"[encode] {images} images in {seconds:.1f} s on this process = "
                          f"{images / max(seconds, 1e-9):.0f} images/s; cache in {run.latents}")
    state.wait_for_everyone()
    return manifest


def _shard_done(run: RunFolder, k: int, key: str) -> bool:
    return shard_key(run.latents / shard_name(k)) == key  # a missing or damaged shard is simply encoded again


def _write_manifest(run: RunFolder, dataset, key: str, vae_hash: str, dataset_hash: str, num_shards: int) -> dict:
    shards = [{"file": shard_name(k)} for k in range(num_shards)]
    for stale in run.latents.glob("shard-*.safetensors"):
        if stale.name not in {s["file"] for s in shards}:
            stale.unlink()
    manifest = {"format": FORMAT_VERSION, "key": key, "vae": vae_hash, "dataset": dataset_hash,
                "num_images": len(dataset), "shards": shards, "captions": dataset.captions,
                "classes": [{"key": c.key, "fields": c.fields} for c in dataset.classes], "complete": True}
    write_text(run.latents / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def cli(argv: list[str] | None = None) -> None:
    run_cli(__doc__, main, argv)


if __name__ == "__main__":
    cli()
