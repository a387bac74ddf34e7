"""Typed configuration: one dataclass per stage, loaded from `configs/*.yaml`, overridden with `--set`.

Every command reads the same experiment file (`--config configs/mnist.yaml`), applies any number of
`--set key.path=value` overrides, checks every key and type, prints the result and saves it as
`run/config.yaml`. Unknown keys and wrong types are errors that name the key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A configuration problem a user can fix; the message names the key and the fix."""


# --------------------------------------------------------------------------------------------------
# The stage configs
# --------------------------------------------------------------------------------------------------


@dataclass
class AugmentConfig:
    rotate_degrees: float = 0.0  # uniform in [-d, d]
    translate: float = 0.0  # max shift, as a fraction of the image size
    scale: float = 0.0  # max zoom in or out, as a fraction (0.1: 0.9x to 1.1x)
    hflip: bool = False  # off by default: a mirrored character is another character


@dataclass
class DataConfig:
    name: str = "mnist"  # a built-in dataset (mnist, devanagari), or "" when `path` is set
    path: str = ""  # a folder: class sub-folders, class_index.jpg files, or metadata.jsonl
    image_size: int = 32
    channels: int = 1  # 1 (grayscale) or 3 (RGB); every image is converted to this
    fit: Literal["pad", "crop", "stretch"] = "pad"  # how a non-square image becomes square
    holdout_fraction: float = 0.1  # the last fraction of each class, never trained on
    max_per_class: int = 0  # 0: all images
    per_class: int = 2000  # images rendered per class by generated datasets (devanagari)
    seed: int = 0  # seed of generated datasets (a dataset does not change with the training seed)
    captions: list[str] = field(default_factory=list)  # templates; empty: the dataset's defaults
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    on_bad_image: Literal["skip", "error"] = "skip"
    num_workers: int = 0  # DataLoader worker processes for folder datasets


@dataclass
class TrainConfig:
    """The optimisation loop every training stage shares."""

    max_steps: int = 1000  # optimizer steps (a cap; `epochs` may stop earlier)
    epochs: float = 0.0  # 0: no epoch limit
    batch_size: int = 64  # per process, per micro-batch
    augment: bool = True  # apply data.augment to this stage's training images
    grad_accum: int = 1
    lr: float = 1e-3
    scale_lr: bool = False  # multiply lr by processes x grad_accum (batch-size scaling)
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0  # cosine decays from lr to lr * min_lr_ratio
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0  # 0 disables clipping
    ema_decay: float = 0.0  # 0 disables the EMA copy of the weights
    ema_warmup: bool = True  # decay ramps up as (1 + step) / (10 + step)
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"  # auto: the launcher's, else bf16 on CUDA; never on CPU
    # torch.compile of the stage's models (inductor) in this mode; reduce-overhead adds CUDA graphs.
    # auto: what `accelerate launch --dynamo_backend` / `accelerate config` say (off by default)
    compile: Literal["auto", "no", "default", "reduce-overhead", "max-autotune"] = "auto"
    save_every: int = 500  # steps between resume checkpoints
    sample_every: int = 500  # steps between sample grids
    log_every: int = 10
    keep_checkpoints: int = 2
    max_bad_steps: int = 20  # consecutive non-finite losses before training stops


@dataclass
class VAEConfig(TrainConfig):
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 16
    mid_attention: bool = True
    kl_weight: float = 1e-6
    lpips: Union[bool, Literal["auto"]] = "auto"  # auto: use LPIPS if its backbone weights are on disk
    lpips_net: Literal["vgg", "alex", "squeeze"] = "vgg"
    lpips_weight: float = 1.0
    disc_start: int = -1  # step at which the PatchGAN loss starts; -1: never
    disc_weight: float = 0.5
    disc_layers: int = 2
    disc_channels: int = 32
    scale_images: int = 2048  # training images used to measure the latent std (scaling_factor)
    eval_images: int = 500  # held-out images for PSNR/SSIM


@dataclass
class ClipConfig(TrainConfig):
    vocab_size: int = 1000
    max_length: int = 16  # tokens per prompt, start and end included
    text_hidden: int = 128
    text_layers: int = 3
    text_heads: int = 4
    vision_hidden: int = 128
    vision_layers: int = 3
    vision_heads: int = 4
    patch_size: int = 4
    projection_dim: int = 128
    caption_variants: int = 0  # perturbed copies of each caption (made-up words inserted) to train on too


@dataclass
class TextEncoderConfig:
    # "": the run's own CLIP from `train-clip`; otherwise a CLIP name or folder that
    # transformers' CLIPTextModel/CLIPTokenizer load offline (e.g. openai/clip-vit-base-patch32).
    pretrained: str = ""


@dataclass
class EncodeConfig:
    batch_size: int = 256
    shard_size: int = 8192  # images per safetensors shard


@dataclass
class LDMConfig(TrainConfig):
    block_out_channels: list[int] = field(default_factory=lambda: [64, 128, 128])
    cross_attention: list[bool] = field(default_factory=lambda: [True, True, False])  # per down block
    layers_per_block: int = 1
    attention_heads: int = 4
    norm_num_groups: int = 32
    cond_dropout: float = 0.1  # probability of the empty prompt, for classifier-free guidance
    num_train_timesteps: int = 1000
    # Stable Diffusion's schedule: its last step keeps a little signal (alpha_bar 0.0047), which every
    # diffusers sampler handles; the cosine schedule's last step (alpha_bar 2e-9) breaks epsilon
    # prediction and ancestral samplers
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "scaled_linear"
    prediction_type: Literal["epsilon", "v_prediction"] = "v_prediction"
    snr_gamma: float = 0.0  # min-SNR-gamma loss weighting (Hang et al. 2023); 0 disables
    offset_noise: float = 0.0  # Guttenberg 2023; 0 disables
    validation_prompts: list[str] = field(default_factory=list)  # empty: one prompt per class
    caption_variants: int = 0  # perturbed copies of each caption (made-up words inserted) to train on too


@dataclass
class SampleConfig:
    num_inference_steps: int = 20
    guidance_scale: float = 4.0


@dataclass
class EvalConfig:
    images_per_class: int = 100
    classifier_steps: int = 600
    classifier_batch_size: int = 128
    # prompts never used in training, for the paraphrase accuracy; {name}/{symbol} as in captions
    paraphrases: list[str] = field(default_factory=list)


@dataclass
class Config:
    run_dir: str = ""  # default: checkpoints/<config file name>
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    ldm: LDMConfig = field(default_factory=LDMConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)


# --------------------------------------------------------------------------------------------------
# Typed loading
# --------------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting only where it is lossless."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping of settings, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if origin in (Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"config key '{key}' must be {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if any(value == option and type(value) is type(option) for option in typing.get_args(tp)):
            return value
        raise ConfigError(f"config key '{key}' must be one of {_type_name(tp)}, got {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        (item_type,) = typing.get_args(tp)
        return [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads "1e-3" as a string (YAML 1.1 wants "1.0e-3")
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"config key '{key}' must be {_type_name(tp)}, got {value!r}")


def from_dict(cls: type, values: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested dict; every key must be a field of the right type."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(
                f"unknown config key '{prefix}{key}'; known keys here: {', '.join(sorted(known))}"
            )
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    return cls(**kwargs)


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: '{key}' is a value, not a section")
        node = child
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`vae.lr=3e-4` -> ("vae.lr", "3e-4" parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"--set expects key.path=value, got '{text}'")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else ""


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML config (or the defaults when `path` is None), apply `--set` overrides, validate."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' not found; the shipped ones are in configs/")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"config file '{path}' is not valid YAML: {error}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping of settings")
    for text in overrides:
        key, value = parse_override(text)
        _set_path(tree, key, value)
    config = from_dict(Config, tree)
    if not config.run_dir:
        config.run_dir = str(Path("checkpoints") / (path.stem if path is not None else "default"))
    validate(config)
    return config


def validate(config: Config) -> None:
    """Range checks that types alone cannot express. Each message says what to change."""

    def require(ok: bool, key: str, message: str) -> None:
        if not ok:
            raise ConfigError(f"config key '{key}' {message}")

    data = config.data
    require(bool(data.name) != bool(data.path), "data.name",
            "and data.path: set exactly one (a built-in dataset name, or a folder path with data.name='')")
    require(data.channels in (1, 3), "data.channels", f"must be 1 or 3, got {data.channels}")
    require(data.image_size >= 8, "data.image_size", f"must be at least 8, got {data.image_size}")
    require(0.0 <= data.holdout_fraction < 1.0, "data.holdout_fraction", "must be in [0, 1)")
    require(data.per_class >= 1, "data.per_class", "must be at least 1")
    require(data.num_workers >= 0, "data.num_workers", "must be >= 0")
    for name in ("vae", "clip", "ldm"):
        stage: TrainConfig = getattr(config, name)
        require(stage.max_steps >= 0, f"{name}.max_steps", f"must be >= 0, got {stage.max_steps}")
        require(stage.epochs >= 0, f"{name}.epochs", "must be >= 0")
        require(stage.batch_size >= 1, f"{name}.batch_size", "must be >= 1")
        require(stage.grad_accum >= 1, f"{name}.grad_accum", "must be >= 1")
        require(stage.lr > 0, f"{name}.lr", "must be > 0")
        require(stage.warmup_steps >= 0, f"{name}.warmup_steps", "must be >= 0")
        require(0.0 <= stage.ema_decay < 1.0, f"{name}.ema_decay", "must be in [0, 1)")
        require(len(stage.adam_betas) == 2, f"{name}.adam_betas", "must be two numbers")
        require(stage.save_every >= 1 and stage.sample_every >= 1 and stage.log_every >= 1,
                f"{name}.save_every", "(and sample_every, log_every) must be >= 1")
    vae = config.vae
    factor = 2 ** (len(vae.block_out_channels) - 1)
    require(data.image_size % factor == 0, "data.image_size",
            f"({data.image_size}) must be divisible by the VAE's downsampling factor {factor} "
            f"(2 ** (len(vae.block_out_channels) - 1)); change one of them")
    require(all(c % vae.norm_num_groups == 0 for c in vae.block_out_channels), "vae.norm_num_groups",
            f"({vae.norm_num_groups}) must divide every vae.block_out_channels {vae.block_out_channels}")
    require(vae.latent_channels >= 1, "vae.latent_channels", "must be >= 1")
    ldm = config.ldm
    require(0.0 <= ldm.cond_dropout <= 1.0, "ldm.cond_dropout", f"must be in [0, 1], got {ldm.cond_dropout}")
    require(len(ldm.cross_attention) == len(ldm.block_out_channels), "ldm.cross_attention",
            "must have one entry per ldm.block_out_channels")
    require(all(c % ldm.norm_num_groups == 0 for c in ldm.block_out_channels), "ldm.norm_num_groups",
            f"({ldm.norm_num_groups}) must divide every ldm.block_out_channels {ldm.block_out_channels}")
    latent_size = data.image_size // factor
    ldm_factor = 2 ** (len(ldm.block_out_channels) - 1)
    require(latent_size % ldm_factor == 0, "ldm.block_out_channels",
            f"has {len(ldm.block_out_channels)} levels, so the latent size ({latent_size}) must be "
            f"divisible by {ldm_factor}; use fewer levels or a larger image")
    clip = config.clip
    require(clip.max_length >= 3, "clip.max_length", "must be >= 3 (start, one token, end)")
    require(data.image_size % clip.patch_size == 0, "clip.patch_size", "must divide data.image_size")
    require(config.sample.num_inference_steps >= 1, "sample.num_inference_steps", "must be >= 1")


def dump_config(config: Config) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False, default_flow_style=None, width=100)
