"""LoRA (Hu et al. 2021) on the UNet's attention projections through peft, saved in diffusers' format so
that `pipe.load_lora_weights(run)` adds it to the base model's pipeline."""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path

from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from common.checkpoint import default_file_mode

LORA_FILE = "pytorch_lora_weights.safetensors"  # the name diffusers' load_lora_weights looks for
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # self- and cross-attention, as diffusers' LoRA scripts do


def add_lora(unet: UNet2DConditionModel, rank: int, alpha: float = 0.0) -> UNet2DConditionModel:
    """Freeze the UNet and add trainable rank-`rank` adapters to its attention (B starts at zero, so the
    model starts exactly as the base)."""
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian", target_modules=TARGETS))
    return unet


def save_lora(unet: UNet2DConditionModel, folder: Path) -> Path:
    """Write the adapters as `folder/pytorch_lora_weights.safetensors` (diffusers' keys and adapter
    metadata), atomically: written beside, then renamed over."""
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    metadata = unet.peft_config["default"].to_dict()
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".lora-") as scratch:
        StableDiffusionPipeline.save_lora_weights(scratch, unet_lora_layers=layers, unet_lora_adapter_metadata=metadata,
                                                  safe_serialization=True)
        os.chmod(Path(scratch) / LORA_FILE, default_file_mode())
        os.replace(Path(scratch) / LORA_FILE, folder / LORA_FILE)
    return folder / LORA_FILE


def merged(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """A copy with the adapters folded into the weights: a plain UNet that needs no peft to load."""
    plain = copy.deepcopy(unet)
    plain.fuse_lora()
    plain.unload_lora()
    return plain
