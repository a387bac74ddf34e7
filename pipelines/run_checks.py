"""A run folder's components, checked where `LatentPipeline` is built, loaded from a run folder or saved into one.

Each check refuses, before anything is written, what diffusers would load or save without a word and what would then
fail far from its cause (or sample noise), naming the folder and the fix.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel

from common.checkpoint import check_safetensors, folder_fingerprint
from common.errors import RunFolderError
from common.run import WRITTEN_BY
from ldm.lora import adapted_layers
from ldm.sampling import check_scheduler, trained_schedule


def check_savable(pipe: Any, kwargs: dict) -> None:
    """Refuse a `save_pretrained` whose folder could not be loaded again or would sample noise."""
    weightless = [name for name in WRITTEN_BY if any(p.is_meta for p in getattr(pipe, name).parameters())]
    if weightless:  # else torch's "Cannot copy out of meta tensor" after the first component's config is written
        raise ValueError(f"the pipeline's {', '.join(weightless)} {'is' if len(weightless) == 1 else 'are'} on the meta "
                         f"device (weights with shapes but no data, e.g. after pipe.to('meta')), so there is nothing to "
                         f"save; load it again, e.g. LatentPipeline.from_pretrained(run), and save that")
    if kwargs.get("safe_serialization") is False:  # a folder of pickles, which from_pretrained refuses to read
        raise ValueError("LatentPipeline saves its weights as safetensors only (from_pretrained never unpickles "
                         ".bin files, so it could not load what safe_serialization=False writes); leave "
                         "safe_serialization out")
    if adapted_layers({"unet": pipe.unet, "text_encoder": pipe.text_encoder}):
        # diffusers would write peft's layers (base_layer, lora_A, ...) into unet/, whose attention weights
        # from_pretrained then leaves uninitialized: the saved folder loads but cannot sample
        raise ValueError("LoRA adapters are loaded in this pipeline, and unet/ saved with them could not be loaded "
                         "again; to save the model with the LoRA merged in, call pipe.fuse_lora() and then "
                         "pipe.unload_lora_weights() first; to save the base, pipe.unload_lora_weights() alone")
    # a scheduler this model cannot sample with, saved, would be the folder's own and so pass the check at sampling
    check_scheduler(pipe.scheduler, pipe.trained_schedule)


def run_trained_schedule(folder: Path) -> dict | None:
    """The noise schedule and prediction type in a run folder's scheduler/scheduler_config.json (what train-ldm
    trained the UNet with; `ldm.sampling.trained_schedule`), or None where there is none."""
    config = folder / "scheduler" / "scheduler_config.json"
    if not config.is_file():
        return None
    return trained_schedule(json.loads(config.read_text(encoding="utf-8")))


def remove_stale_shard_index(folder: Path) -> None:
    """Remove the index of an earlier sharded save in `folder` whose shards are gone: diffusers and transformers
    delete the old shards when they save unsharded over a sharded save, but keep its index, and loaders then look for
    the shards it lists ("does not appear to have a file named ...-00001-of-00006.safetensors")."""
    for index in sorted(folder.glob("*.index*.json")) if folder.is_dir() else []:
        shards = set(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}).values())
        if any(not (folder / shard).is_file() for shard in shards):
            index.unlink()


def check_built_from(folder: Path, built_from: dict) -> None:
    """Refuse a run folder whose VAE, text encoder or tokenizer (runs since it was recorded) was replaced after
    its UNet was trained, or whose UNet is not the one its model_index.json was written with."""
    if not folder.is_dir():
        return  # loaded from elsewhere (a hub cache): nothing to compare
    changed = [name for name, digest in (built_from or {}).items()
               if (folder / name).is_dir() and folder_fingerprint(folder / name) != digest]
    if "unet" in changed:
        raise RunFolderError(f"unet/ in {folder} is not the UNet its model_index.json was written with: train-ldm was "
                             f"stopped while writing them, or unet/ was replaced since. Re-run `train-ldm --config ...` "
                             f"into this run folder to write both again (or restore the old unet/)")
    if changed:
        raise RunFolderError(f"{' and '.join(f'{name}/' for name in changed)} in {folder} changed after unet/ was trained "
                             f"on {'them' if len(changed) > 1 else 'it'}: the UNet no longer matches. Re-run "
                             f"`encode-dataset` and `train-ldm` (or restore the old {changed[0]}/)")


def check_all_weights_saved(folder: Path, pipe: Any, exclude: dict) -> None:
    """Refuse a run folder whose vae/, text_encoder/ or unet/ safetensors lack some of their model's weights (a
    pipeline saved with LoRA adapters loaded, a hand-edited file): diffusers and transformers load such a folder
    with those weights newly initialized, random or left on the meta device, saying so only in a warning.
    Components passed to from_pretrained (`exclude`) are the caller's own."""
    if not folder.is_dir():
        return  # loaded from elsewhere (a hub cache)
    for name, command in WRITTEN_BY.items():
        files = sorted((folder / name).glob("*.safetensors"))
        if name in exclude or not files:
            continue
        saved = {key for path in files for key in check_safetensors(path, command)[1]}
        missing = sorted(set(getattr(pipe, name).state_dict()) - saved)
        if missing:
            raise RunFolderError(f"{name}/ in {folder} lacks {len(missing)} of its model's weights ("
                                 f"{', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}), which would be "
                                 f"random: it was saved incomplete (e.g. with LoRA adapters loaded). Re-run "
                                 f"`{command} --config ...` into this run folder, or restore {name}/ from a copy of the run")


def check_components(vae: AutoencoderKL, text_encoder: CLIPTextModel, unet: UNet2DConditionModel) -> None:
    """Refuse components that cannot work together (e.g. folders copied from different runs)."""
    scale = vae.config.scaling_factor
    if not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise RunFolderError(f"vae/config.json has scaling_factor {scale!r}; it must be a positive number "
                             f"(train-vae measures it). Re-run `train-vae`, or restore vae/config.json")
    if unet.config.in_channels != vae.config.latent_channels:
        raise RunFolderError(f"the UNet takes {unet.config.in_channels}-channel latents but the VAE makes "
                             f"{vae.config.latent_channels}; unet/ and vae/ come from different runs. Re-run "
                             f"`train-ldm` on this VAE's latents")
    if unet.config.cross_attention_dim != text_encoder.config.hidden_size:
        raise RunFolderError(f"the UNet cross-attends to {unet.config.cross_attention_dim}-d text states but the "
                             f"text encoder makes {text_encoder.config.hidden_size}-d ones; unet/ and text_encoder/ "
                             f"come from different runs. Re-run `train-ldm` with this text encoder")
