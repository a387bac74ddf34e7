"""Typed configuration: one dataclass per stage, loaded from `configs/*.yaml`, overridden with `--set`.

Every command reads the same experiment file (`--config configs/mnist.yaml`), applies any number of
`--set key.path=value` overrides, checks every key and type, prints the result and saves it as
`run/config.yaml`. Unknown keys and wrong types are errors that name the key.
"""

from __future__ import annotations

import dataclasses
import math
import string
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A configuration problem a user can fix; the message names the key and the fix."""


SEED_LIMIT = 2**63  # seeds go to torch.Generator.manual_seed and numpy as signed 64-bit integers


def seed_problem(seed: int) -> str | None:
    """What is wrong with `seed` as a seed (its range), or None; the caller names the key or option."""
    return None if 0 <= seed < SEED_LIMIT else f"must be in [0, 2**63), got {seed}"


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
    name: str = "mnist"  # a built-in dataset (mnist, devanagari, letters), or "" when `path` is set
    path: str = ""  # a folder: class sub-folders, class_index.jpg files, or metadata.jsonl
    image_size: int = 32
    channels: int = 1  # 1 (grayscale) or 3 (RGB); every image is converted to this
    fit: Literal["pad", "crop", "stretch"] = "pad"  # how a non-square image becomes square
    holdout_fraction: float = 0.1  # the last fraction of each class, never trained on
    max_per_class: int = 0  # 0: all images
    per_class: int = 2000  # images rendered per class by generated datasets (devanagari, letters)
    # rendered datasets: hold out every image of this font (letters: "" = its last font; devanagari:
    # "" = the last holdout_fraction of each class), so held-out images are a hand never trained on
    holdout_font: str = ""
    seed: int = 0  # seed of generated datasets (a dataset does not change with the training seed)
    captions: list[str] = field(default_factory=list)  # templates; empty: the dataset's defaults
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    on_bad_image: Literal["skip", "error"] = "skip"
    num_workers: int = 0  # DataLoader worker processes for folder datasets


# accelerate's tracker names (accelerate.utils.LoggerType), kept here so loading a config imports no torch
TRACKERS = ("all", "aim", "tensorboard", "wandb", "trackio", "comet_ml", "mlflow", "clearml", "dvclive", "swanlab")


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
    # experiment trackers (accelerate's log_with): "auto" is tensorboard when installed (logs in
    # run/logs/<stage>/), "none", "all", or names such as "tensorboard,wandb"
    report_to: str = "auto"
    # start from trained weights: a run folder, or a diffusers-format folder of this stage's model
    init_from: str = ""


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


MIN_VOCAB_SIZE = 2 * 256 + 2  # train-clip's tokenizer: every byte alone and word-final, start, end (ldm/text.py)


@dataclass
class ClipConfig(TrainConfig):
    vocab_size: int = 1000  # at least MIN_VOCAB_SIZE; the tokens beyond it are merges learned from the captions
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
    # the empty prompt as a negative text in every batch (see ldm/train_clip.py); letters train better without
    empty_prompt_negative: bool = True


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
    # training timesteps: uniform, or logit-normal (Esser et al. 2024, SD3), which favours mid noise levels
    timestep_sampling: Literal["uniform", "logit_normal"] = "uniform"
    offset_noise: float = 0.0  # Guttenberg 2023; 0 disables
    validation_prompts: list[str] = field(default_factory=list)  # empty: one prompt per class
    caption_variants: int = 0  # perturbed copies of each caption (made-up words inserted) to train on too
    # LoRA (Hu et al. 2021) on the attention of the ldm.init_from UNet instead of training all of it;
    # 0: full training. lora_alpha 0 means alpha = rank (scale 1)
    lora_rank: int = 0
    lora_alpha: float = 0.0


@dataclass
class SampleConfig:
    num_inference_steps: int = 20
    guidance_scale: float = 4.0
    # [start, stop): the fraction of the steps that are guided (0 = the noisiest); the rest are conditional only
    guidance_interval: list[float] = field(default_factory=lambda: [0.0, 1.0])


@dataclass
class EvalConfig:
    images_per_class: int = 100
    classifier_steps: int = 600
    classifier_batch_size: int = 128
    # the evaluator's own seed, not the run's: runs of different seeds are measured with the same classifier
    classifier_seed: int = 0
    # the split the evaluator classifier learns from; its accuracy on the other split is the ceiling.
    # holdout: a rendered dataset's held-out font (data.holdout_font), so recognition asks whether the
    # generated glyphs read as the characters to a reader of a hand the model never saw
    classifier_trained_on: Literal["train", "holdout"] = "train"
    # letters: it also learns print fonts the model never sees (letters.PRINT_FONTS), a reader of more than one hand
    classifier_print_fonts: bool = False
    # prompts never used in training, for the paraphrase accuracy; {name}/{symbol} as in captions
    paraphrases: list[str] = field(default_factory=list)
    # tune the run's sampling defaults first (pipelines/tuning.py): every steps x guidance of the grid is
    # measured, and the best by the stated rule is saved in model_index.json for pipe(prompt) to use
    tune: bool = False
    tune_guidance: list[float] = field(default_factory=lambda: [1.25, 1.5, 1.75, 2.0, 2.5, 3.0])
    tune_steps: list[int] = field(default_factory=lambda: [20])
    tune_images_per_class: int = 20
    tune_min_recognition: float = 0.97
    tune_min_class: float = 0.0  # and the weakest class at least this (0: no condition), see pipelines/tuning.py
    tune_guidance_intervals: list[list[float]] = field(default_factory=lambda: [[0.0, 1.0]])  # as sample.guidance_interval
    # caption datasets (no classes): how many held-out captions are drawn, one image each, for the
    # CLIP score and the Frechet distance in the run's own CLIP image space
    caption_images: int = 256


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


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def _floats(node: Any, prefix: str = "") -> list[tuple[str, float]]:
    """Every float in a config tree, with its dotted key."""
    found = []
    for f in dataclasses.fields(node):
        value, key = getattr(node, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            found += _floats(value, key + ".")
        elif isinstance(value, float):
            found.append((key, value))
        elif isinstance(value, list):
            found += [(f"{key}[{i}]", v) for i, v in enumerate(value) if isinstance(v, float)]
    return found


def template_problem(template: str) -> str | None:
    """Why a caption template cannot be formatted with a class's fields, or None if it can."""
    if not template.strip():  # the empty prompt is classifier-free guidance's unconditional one
        return "it is empty, which is the unconditional prompt; write a caption such as 'Draw a {name}'"
    try:
        fields = [parsed[1:] for parsed in string.Formatter().parse(template) if parsed[1] is not None]
    except ValueError as error:
        return str(error)
    if any(not name.isidentifier() for name, _, _ in fields):
        return "every {} must name a field, e.g. {name} or {symbol}"
    for name, spec, conversion in fields:  # values are plain text: !r or :>10 fails on them or garbles the caption
        if spec or conversion:
            written = "{" + name + ("!" + conversion if conversion else "") + (":" + spec if spec else "") + "}"
            return f"{written} has a conversion or format spec; write the field as {{{name}}}"
    return None


def validate(config: Config) -> None:
    """Everything a stage would otherwise trip over later, checked before anything is written.
    Each message names the key, the value and what to change."""

    def require(ok: bool, key: str, message: str) -> None:
        if not ok:
            raise ConfigError(f"config key '{key}' {message}")

    for key, value in _floats(config):
        require(math.isfinite(value), key, f"must be a finite number, got {value}")
    for key, seed in (("seed", config.seed), ("data.seed", config.data.seed),
                      ("evaluate.classifier_seed", config.evaluate.classifier_seed)):
        require(seed_problem(seed) is None, key, seed_problem(seed) or "")
    data = config.data
    require(bool(data.name) != bool(data.path), "data.path" if data.path else "data.name",
            f"({data.path or data.name!r}): set exactly one of data.name (a built-in dataset) and data.path (a "
            f"folder, with data.name='')")
    require(data.channels in (1, 3), "data.channels", f"must be 1 or 3, got {data.channels}")
    require(8 <= data.image_size <= 1024, "data.image_size", f"must be in [8, 1024], got {data.image_size}")
    require(0.0 <= data.holdout_fraction < 1.0, "data.holdout_fraction", f"must be in [0, 1), got {data.holdout_fraction}")
    require(data.max_per_class >= 0, "data.max_per_class", f"must be >= 0 (0: all images), got {data.max_per_class}")
    require(data.per_class >= 1, "data.per_class", f"must be at least 1, got {data.per_class}")
    require(not data.holdout_font or data.name in ("letters", "devanagari"), "data.holdout_font",
            f"({data.holdout_font!r}) holds out one font of a rendered dataset (data.name=letters or devanagari), "
            f"not of {data.name or data.path!r}; leave it empty and use data.holdout_fraction")
    require(data.num_workers >= 0, "data.num_workers", f"must be >= 0, got {data.num_workers}")
    for i, template in enumerate(data.captions):
        problem = template_problem(template)
        require(problem is None, f"data.captions[{i}]", f"{template!r} is not a caption template ({problem})")
    augment = data.augment
    require(0 <= augment.rotate_degrees <= 180, "data.augment.rotate_degrees", f"must be in [0, 180], got {augment.rotate_degrees}")
    for key in ("translate", "scale"):
        require(0 <= getattr(augment, key) < 1, f"data.augment.{key}", f"must be in [0, 1), got {getattr(augment, key)}")
    for name in ("vae", "clip", "ldm"):
        stage: TrainConfig = getattr(config, name)
        require(stage.max_steps >= 0, f"{name}.max_steps", f"must be >= 0, got {stage.max_steps}")
        require(stage.epochs >= 0, f"{name}.epochs", f"must be >= 0, got {stage.epochs}")
        require(stage.batch_size >= 1, f"{name}.batch_size", f"must be >= 1, got {stage.batch_size}")
        require(stage.grad_accum >= 1, f"{name}.grad_accum", f"must be >= 1, got {stage.grad_accum}")
        require(stage.lr > 0, f"{name}.lr", f"must be > 0, got {stage.lr}")
        require(stage.warmup_steps >= 0, f"{name}.warmup_steps", f"must be >= 0, got {stage.warmup_steps}")
        require(0.0 <= stage.min_lr_ratio <= 1.0, f"{name}.min_lr_ratio", f"must be in [0, 1], got {stage.min_lr_ratio}")
        require(stage.weight_decay >= 0, f"{name}.weight_decay", f"must be >= 0, got {stage.weight_decay}")
        require(stage.grad_clip >= 0, f"{name}.grad_clip", f"must be >= 0 (0: no clipping), got {stage.grad_clip}")
        require(0.0 <= stage.ema_decay < 1.0, f"{name}.ema_decay", f"must be in [0, 1), got {stage.ema_decay}")
        require(len(stage.adam_betas) == 2 and all(0 <= b < 1 for b in stage.adam_betas), f"{name}.adam_betas",
                f"must be two numbers in [0, 1), got {stage.adam_betas}")
        trackers = [t.strip() for t in stage.report_to.split(",")]
        require(all(t in ("auto", "none", *TRACKERS) for t in trackers) and (len(trackers) == 1 or "auto" not in trackers
                and "none" not in trackers), f"{name}.report_to",
                f"must be auto, none, all, or tracker names separated by commas ({', '.join(TRACKERS[1:])}); "
                f"got {stage.report_to!r}")
        for every in ("save_every", "sample_every", "log_every", "keep_checkpoints", "max_bad_steps"):
            require(getattr(stage, every) >= 1, f"{name}.{every}", f"must be >= 1, got {getattr(stage, every)}")
    def require_levels(name: str, model: VAEConfig | LDMConfig) -> None:
        """The widths, blocks per level and GroupNorm groups of the VAE or the UNet."""
        channels, groups = model.block_out_channels, model.norm_num_groups
        require(len(channels) >= 1 and all(c >= 1 for c in channels), f"{name}.block_out_channels",
                f"must be a non-empty list of positive widths, got {channels}")
        require(model.layers_per_block >= 1, f"{name}.layers_per_block", f"must be >= 1, got {model.layers_per_block}")
        require(groups >= 1, f"{name}.norm_num_groups", f"must be >= 1, got {groups}")
        require(all(c % groups == 0 for c in channels), f"{name}.norm_num_groups",
                f"({groups}) must divide every {name}.block_out_channels {channels}")

    vae = config.vae
    require_levels("vae", vae)
    require(vae.latent_channels >= 1, "vae.latent_channels", f"must be >= 1, got {vae.latent_channels}")
    for key in ("kl_weight", "lpips_weight", "disc_weight"):
        require(getattr(vae, key) >= 0, f"vae.{key}", f"must be >= 0, got {getattr(vae, key)}")
    for key in ("disc_layers", "disc_channels", "scale_images", "eval_images"):
        require(getattr(vae, key) >= 1, f"vae.{key}", f"must be >= 1, got {getattr(vae, key)}")
    factor = 2 ** (len(vae.block_out_channels) - 1)
    require(data.image_size % factor == 0, "data.image_size",
            f"({data.image_size}) must be divisible by the VAE's downsampling factor {factor} "
            f"(2 ** (len(vae.block_out_channels) - 1)); change one of them")
    clip = config.clip
    require(clip.max_length >= 3, "clip.max_length", f"must be >= 3 (start, one token, end), got {clip.max_length}")
    require(clip.vocab_size >= MIN_VOCAB_SIZE, "clip.vocab_size",
            f"must be >= {MIN_VOCAB_SIZE} (every byte, alone and word-final, and the start and end tokens, so that any "
            f"prompt tokenizes; tokens beyond those are merges learned from the captions), got {clip.vocab_size}")
    for key in ("text_hidden", "text_layers", "text_heads", "vision_hidden", "vision_layers",
                "vision_heads", "patch_size", "projection_dim"):
        require(getattr(clip, key) >= 1, f"clip.{key}", f"must be >= 1, got {getattr(clip, key)}")
    require(clip.caption_variants >= 0, "clip.caption_variants", f"must be >= 0, got {clip.caption_variants}")
    require(clip.text_hidden % clip.text_heads == 0, "clip.text_heads", f"({clip.text_heads}) must divide clip.text_hidden ({clip.text_hidden})")
    require(clip.vision_hidden % clip.vision_heads == 0, "clip.vision_heads",
            f"({clip.vision_heads}) must divide clip.vision_hidden ({clip.vision_hidden})")
    require(data.image_size % clip.patch_size == 0, "clip.patch_size",
            f"({clip.patch_size}) must divide data.image_size ({data.image_size})")
    encode = config.encode
    require(encode.batch_size >= 1, "encode.batch_size", f"must be >= 1, got {encode.batch_size}")
    require(encode.shard_size >= 1, "encode.shard_size", f"must be >= 1, got {encode.shard_size}")
    ldm = config.ldm
    require_levels("ldm", ldm)
    require(ldm.attention_heads >= 1, "ldm.attention_heads", f"must be >= 1, got {ldm.attention_heads}")
    require(all(c % ldm.attention_heads == 0 for c in ldm.block_out_channels), "ldm.attention_heads",
            f"({ldm.attention_heads}) must divide every ldm.block_out_channels {ldm.block_out_channels}")
    require(0.0 <= ldm.cond_dropout <= 1.0, "ldm.cond_dropout", f"must be in [0, 1], got {ldm.cond_dropout}")
    require(len(ldm.cross_attention) == len(ldm.block_out_channels), "ldm.cross_attention",
            "must have one entry per ldm.block_out_channels")
    require(ldm.num_train_timesteps >= 2, "ldm.num_train_timesteps", f"must be >= 2, got {ldm.num_train_timesteps}")
    for key in ("snr_gamma", "offset_noise"):
        require(getattr(ldm, key) >= 0, f"ldm.{key}", f"must be >= 0, got {getattr(ldm, key)}")
    require(ldm.caption_variants >= 0, "ldm.caption_variants", f"must be >= 0, got {ldm.caption_variants}")
    require(ldm.lora_rank >= 0, "ldm.lora_rank", f"must be >= 0 (0: no LoRA, train the whole UNet), got {ldm.lora_rank}")
    require(ldm.lora_alpha >= 0, "ldm.lora_alpha", f"must be >= 0 (0: alpha = ldm.lora_rank), got {ldm.lora_alpha}")
    require(ldm.lora_rank == 0 or bool(ldm.init_from), "ldm.lora_rank",
            f"({ldm.lora_rank}) adapts a trained UNet: set ldm.init_from to its run folder, or ldm.lora_rank=0")
    latent_size = data.image_size // factor
    ldm_factor = 2 ** (len(ldm.block_out_channels) - 1)
    require(latent_size % ldm_factor == 0, "ldm.block_out_channels",
            f"has {len(ldm.block_out_channels)} levels, so the latent size ({latent_size} = data.image_size "
            f"{data.image_size} / the VAE factor {factor} of vae.block_out_channels) must be divisible by {ldm_factor}; use fewer levels or a larger image")
    sample = config.sample
    require(1 <= sample.num_inference_steps <= ldm.num_train_timesteps, "sample.num_inference_steps",
            f"must be in [1, ldm.num_train_timesteps = {ldm.num_train_timesteps}], got {sample.num_inference_steps}")
    require(sample.guidance_scale >= 0, "sample.guidance_scale", f"must be >= 0, got {sample.guidance_scale}")
    for key, interval in [("sample.guidance_interval", sample.guidance_interval)] + [
            (f"evaluate.tune_guidance_intervals[{i}]", v) for i, v in enumerate(config.evaluate.tune_guidance_intervals)]:
        require(len(interval) == 2 and 0 <= interval[0] < interval[1] <= 1, key,
                f"must be [start, stop] with 0 <= start < stop <= 1 (fractions of the sampling steps), got {interval}")
    evaluation = config.evaluate
    require(bool(evaluation.tune_guidance_intervals), "evaluate.tune_guidance_intervals",
            f"must be a non-empty list of [start, stop] intervals, e.g. [[0.0, 1.0]] (every step guided), "
            f"got {evaluation.tune_guidance_intervals}")
    require(bool(evaluation.tune_guidance) and all(g >= 0 for g in evaluation.tune_guidance), "evaluate.tune_guidance",
            f"must be a non-empty list of numbers >= 0, got {evaluation.tune_guidance}")
    require(bool(evaluation.tune_steps) and all(1 <= n <= ldm.num_train_timesteps for n in evaluation.tune_steps),
            "evaluate.tune_steps", f"must be a non-empty list of steps in [1, ldm.num_train_timesteps = {ldm.num_train_timesteps}], "
            f"got {evaluation.tune_steps}")
    for key in ("tune_min_recognition", "tune_min_class"):
        require(0 <= getattr(evaluation, key) <= 1, f"evaluate.{key}", f"must be in [0, 1], got {getattr(evaluation, key)}")
    for key in ("images_per_class", "tune_images_per_class", "classifier_steps", "classifier_batch_size", "caption_images"):
        require(getattr(evaluation, key) >= 1, f"evaluate.{key}", f"must be >= 1, got {getattr(evaluation, key)}")
    require(not evaluation.classifier_print_fonts or data.name == "letters", "evaluate.classifier_print_fonts",
            f"only the letters dataset has print fonts to learn from, not {data.name or data.path!r}; set it to false")
    for i, template in enumerate(evaluation.paraphrases):
        problem = template_problem(template)
        require(problem is None, f"evaluate.paraphrases[{i}]", f"{template!r} is not a caption template ({problem})")


def dump_config(config: Config | dict) -> str:  # a Config, or one as a dict (`to_dict`)
    return yaml.safe_dump(to_dict(config) if dataclasses.is_dataclass(config) else config, sort_keys=False,
                          default_flow_style=None, width=100)
