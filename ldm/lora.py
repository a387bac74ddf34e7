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
from common.errors import RunFolderError

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


def safetensors_only(source, kwargs: dict) -> dict:
    """`kwargs` for diffusers' `lora_state_dict` that read `source` from safetensors only. LoRA files often come
    from strangers, and diffusers would otherwise fall back to unpickling a `.bin` (torch.load) where no
    safetensors file is, or where `weight_name` names one; such a source is refused, naming what it holds."""
    weight_name = kwargs.get("weight_name")
    if kwargs.get("use_safetensors") is False or (weight_name and not str(weight_name).endswith(".safetensors")):
        raise ValueError(f"LoRA weights are read from safetensors files only, never unpickled (got use_safetensors="
                         f"{kwargs.get('use_safetensors')}, weight_name={weight_name!r}); pass a folder holding "
                         f"{LORA_FILE}, or a .safetensors weight_name")
    folder = Path(str(source)) / (kwargs.get("subfolder") or "")
    if not isinstance(source, dict) and folder.is_dir() and not any(folder.glob("*.safetensors")):
        held = ", ".join(path.name for path in sorted(folder.glob("*.bin"))) or "no weights"
        raise RunFolderError(f"no LoRA weights in safetensors in {folder} (it holds {held}; pickled weights are never "
                             f"unpickled): pass the folder that train-ldm with ldm.lora_rank wrote, which holds {LORA_FILE}")
    return {**kwargs, "use_safetensors": True}
