"""LoRA (Hu et al. 2021) on the UNet's attention projections through peft, saved in diffusers' format so
that `pipe.load_lora_weights(run)` adds it to the base model's pipeline."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
import yaml

from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.lora_base import _best_guess_weight_name
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from common.checkpoint import check_finite_weights, check_safetensors, default_file_mode, remove_leftovers
from common.errors import RunFolderError

LORA_FILE = "pytorch_lora_weights.safetensors"  # the name diffusers' load_lora_weights looks for
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # self- and cross-attention, as diffusers' LoRA scripts do
BASE_KEY = "base_unet"  # safetensors metadata: fingerprints of the UNet the adapters were trained on, per dtype
BASE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def add_lora(unet: UNet2DConditionModel, rank: int, alpha: float = 0.0) -> UNet2DConditionModel:
    """Freeze the UNet and add trainable rank-`rank` adapters to its attention (B starts at zero, so the
    model starts exactly as the base)."""
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian", target_modules=TARGETS))
    return unet


def base_fingerprint(unet: UNet2DConditionModel, dtype: torch.dtype) -> str:
    """Hash of a UNet's own weights as `dtype`, adapters left out (peft's `<layer>.base_layer.weight` read as
    `<layer>.weight`): the same for the base a LoRA was trained on and for that base loaded again, with or
    without adapters in it, on any device, when loaded in that dtype."""
    h = hashlib.sha256()
    for name, tensor in sorted((n.replace(".base_layer.", "."), t) for n, t in unet.state_dict().items() if "lora_" not in n):
        h.update(f"{name}{tuple(tensor.shape)}".encode())
        h.update(tensor.detach().to("cpu", dtype).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def save_lora(unet: UNet2DConditionModel, folder: Path) -> Path:
    """Write the adapters as `folder/pytorch_lora_weights.safetensors` (diffusers' keys and adapter
    metadata, and the base's fingerprints under `base_unet`), atomically: written beside, then renamed over."""
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    metadata = unet.peft_config["default"].to_dict()
    base = {name: base_fingerprint(unet, dtype) for name, dtype in BASE_DTYPES.items()}
    folder.mkdir(parents=True, exist_ok=True)
    remove_leftovers(folder, LORA_FILE)  # of a write killed mid-way (train-ldm holds the ldm lock here)
    with tempfile.TemporaryDirectory(dir=folder, prefix=f".{LORA_FILE}.", suffix=".tmp") as scratch:
        StableDiffusionPipeline.save_lora_weights(scratch, unet_lora_layers=layers, unet_lora_adapter_metadata=metadata,
                                                  safe_serialization=True)
        written = Path(scratch) / LORA_FILE
        with safe_open(str(written), "pt") as f:
            header = f.metadata() or {}
        save_file(load_file(written), written, metadata={**header, BASE_KEY: json.dumps(base)})
        os.chmod(written, default_file_mode())
        os.replace(written, folder / LORA_FILE)
    return folder / LORA_FILE


def lora_file(source, kwargs: dict) -> Path | None:
    """The safetensors file `load_lora_weights(source, **kwargs)` reads, when it is on this disk."""
    if isinstance(source, dict):
        return None
    path = Path(str(source)).expanduser()
    if not path.is_file():
        path = path / (kwargs.get("subfolder") or "") / (kwargs.get("weight_name") or LORA_FILE)
    return path if path.is_file() and path.suffix == ".safetensors" else None  # anything else: safetensors_only refuses it


def named_base(config: Path) -> str:
    """The `ldm.init_from` a LoRA run's config.yaml names, or "" where there is none or it cannot be read: a hint in
    the refusal below, which a damaged or edited file must not turn into an unrelated YAML or decoding error."""
    try:
        tree = yaml.safe_load(config.read_text(encoding="utf-8")) if config.is_file() else None
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return ""
    ldm = tree.get("ldm") if isinstance(tree, dict) else None
    base = ldm.get("init_from") if isinstance(ldm, dict) else None
    return base if isinstance(base, str) else ""


def check_adapter_base(unet: UNet2DConditionModel, source, kwargs: dict) -> None:
    """Refuse adapters trained on another UNet than `unet`: peft would load them wherever the layer names match
    (only a logged warning where they don't), and the images would change for no meaning. Files that record no
    base (not written by train-ldm) cannot be checked and load as before."""
    path = lora_file(source, kwargs)
    if path is None:
        return
    with safe_open(str(path), "pt") as f:
        recorded = (f.metadata() or {}).get(BASE_KEY)
    if recorded is None:
        return
    dtype = next((name for name, value in BASE_DTYPES.items() if value == unet.dtype), "float32")
    expected = json.loads(recorded).get(dtype)
    if expected is None or expected == base_fingerprint(unet, BASE_DTYPES[dtype]):
        return
    base = named_base(path.parent / "config.yaml")
    trained_on = f" (its config.yaml: ldm.init_from {base})" if base else ""
    raise RunFolderError(f"the LoRA in {path} was trained on another UNet than this pipeline's{trained_on}: its adapters "
                         f"would change the images without meaning. Load it into the pipeline of its base run "
                         f"(LatentPipeline.from_pretrained(<that run>)); if this pipeline's LoRA was fused, unfuse_lora() "
                         f"first; or pass check_base=False to load it anyway")


def merged(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """A copy with the adapters folded into the weights: a plain UNet that needs no peft to load."""
    plain = copy.deepcopy(unet)
    plain.fuse_lora()
    plain.unload_lora()
    return plain


def adapted_layers(models: dict[str, torch.nn.Module]) -> dict[str, BaseTunerLayer]:
    """The layers peft adapted in `models` ({"unet": ..., "text_encoder": ...}), by "model.layer" name."""
    return {f"{model_name}.{name}": module for model_name, model in models.items() if model is not None
            for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)}


def keep_unfused(models: dict[str, torch.nn.Module], kept: dict[str, tuple]) -> dict[str, tuple]:
    """Before `fuse_lora`: by name, a copy (on the CPU) of the own weight of each adapted layer not fused yet, and
    its adapters' scales; a layer fused already keeps its earlier copy. peft's unfuse subtracts the adapters'
    product again, which leaves the weights off by rounding, so the base no longer hashes as the UNet its LoRA was
    trained on; and `fuse_lora(lora_scale=s)` multiplies the adapters' scales by s for good. See `restore_unfused`."""
    layers = adapted_layers(models)
    earlier = {name: copy for name, copy in kept.items() if name in layers and layers[name].merged}
    return {**earlier, **{name: (layer.get_base_layer().weight.detach().to("cpu", copy=True),
                                 dict(getattr(layer, "scaling", {}))) for name, layer in layers.items() if not layer.merged}}


def restore_unfused(models: dict[str, torch.nn.Module], kept: dict[str, tuple], fused: set[str]) -> dict[str, tuple]:
    """After `unfuse_lora`: each layer of `fused` (the names fused before it) that it unfused gets its weight and
    adapter scales back from their copies from `keep_unfused`, bit for bit. Copies of other layers are stale (their
    fused weights were kept by `unload_lora_weights`, as diffusers bakes a LoRA in) and are dropped. Returns the
    copies of the layers still fused."""
    layers = adapted_layers(models)
    for name in fused & kept.keys():
        if name in layers and not layers[name].merged:
            weight, scaling = kept[name]
            with torch.no_grad():
                layers[name].get_base_layer().weight.copy_(weight)
            getattr(layers[name], "scaling", {}).update(scaling)
    return {name: copy for name, copy in kept.items() if name in fused and name in layers and layers[name].merged}


def local_source(source):
    """`load_lora_weights`' source with `~` expanded (diffusers would read `~/x` as a Hub repository name)."""
    return os.path.expanduser(source) if isinstance(source, (str, os.PathLike)) else source


def missing_source(source) -> FileNotFoundError | None:
    """The error for a source that is neither on this disk nor loadable from the Hub (a mistyped folder, which
    diffusers reports as a failed Hub lookup: 'Repo id must be in the form ...', or offline mode's 'you must
    specify a weight_name'); None for a source that is here, so its own error stands."""
    if isinstance(source, dict) or Path(source).exists():
        return None
    return FileNotFoundError(f"no LoRA folder or file '{source}' (and no LoRA of that name on the Hugging Face Hub or "
                             f"in its cache): pass the folder that train-ldm with ldm.lora_rank wrote (it holds "
                             f"{LORA_FILE}), e.g. pipe.load_lora_weights('checkpoints/mnist-lora')")


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
    if not isinstance(source, dict) and folder.is_dir() and not weight_name and not (folder / LORA_FILE).is_file():
        # a LoRA under another name (renamed to share it): diffusers would guess the file; named here, the checks
        # below (and the base check) read the very file it loads
        guess = _best_guess_weight_name(str(folder), local_files_only=True)
        kwargs = {**kwargs, "weight_name": guess} if guess else kwargs
    path = lora_file(source, kwargs)
    if path is not None:  # a cut-short or foreign file named, before safetensors fails on it with a bare header error
        names = [name for name in check_safetensors(path, "train-ldm")[1] if name != "__metadata__"]
        if not any("lora" in name for name in names):  # diffusers' own refusal names neither the file nor its content
            held = f"its tensors, such as '{min(names)}', are not named lora" if names else "it holds no tensors"
            raise ValueError(f"{path} holds no LoRA adapters ({held}): pass the folder that train-ldm with "
                             f"ldm.lora_rank wrote, which holds {LORA_FILE}")
        check_finite_weights(path, "train-ldm")  # else every image is NaN, and sampling gets the blame
    return {**kwargs, "use_safetensors": True}
