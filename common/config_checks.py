"""Checks of a loaded config (`validate`): every value in range and every combination possible, each
problem a ConfigError naming the key, the value and the fix. `common/config_yaml.py` calls it on load."""

from __future__ import annotations

import dataclasses
import math
import string
from typing import Any

from common.config import MIN_VOCAB_SIZE, TRACKERS, Config, ConfigError, LDMConfig, TrainConfig, VAEConfig

SEED_LIMIT = 2**63  # seeds go to torch.Generator.manual_seed and numpy as signed 64-bit integers


def seed_problem(seed: int) -> str | None:
    """What is wrong with `seed` as a seed (its range), or None; the caller names the key or option."""
    return None if 0 <= seed < SEED_LIMIT else f"must be in [0, 2**63), got {seed}"


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


def cuda_graphs_with_accumulation(stage: str, what: str, grad_accum: int) -> str:
    """Why `what` (a setting that turns CUDA graphs on for `stage`) cannot train with `grad_accum` > 1 micro-batches."""
    return (f"{what} replays CUDA graphs, and each replay writes its outputs into the same memory: with "
            f"{stage}.grad_accum={grad_accum}, the gradients one micro-batch leaves would be overwritten by the next "
            f"one's backward (pytorch/pytorch#169545). Set {stage}.grad_accum=1 with a larger {stage}.batch_size, "
            f"or {stage}.compile=default")


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
        require(stage.compile != "reduce-overhead" or stage.grad_accum == 1, f"{name}.compile",
                "is " + cuda_graphs_with_accumulation(name, "reduce-overhead, which", stage.grad_accum))
        require(stage.lr > 0, f"{name}.lr", f"must be > 0, got {stage.lr}")
        require(stage.warmup_steps >= 0, f"{name}.warmup_steps", f"must be >= 0, got {stage.warmup_steps}")
        require(0.0 <= stage.min_lr_ratio <= 1.0, f"{name}.min_lr_ratio", f"must be in [0, 1], got {stage.min_lr_ratio}")
        require(stage.weight_decay >= 0, f"{name}.weight_decay", f"must be >= 0, got {stage.weight_decay}")
        require(stage.grad_clip >= 0, f"{name}.grad_clip", f"must be >= 0 (0: no clipping), got {stage.grad_clip}")
        require(0.0 <= stage.ema_decay < 1.0, f"{name}.ema_decay", f"must be in [0, 1), got {stage.ema_decay}")
        require(len(stage.adam_betas) == 2 and all(0 <= b < 1 for b in stage.adam_betas), f"{name}.adam_betas",
                f"must be two numbers in [0, 1), got {stage.adam_betas}")
        trackers = [t.strip() for t in stage.report_to.split(",")]
        # auto, none and all stand alone (all with a name would be read as a package to install); a name
        # given twice would start two trackers writing the same curves
        require(all(t in ("auto", "none", *TRACKERS) for t in trackers) and (len(trackers) == 1 or not
                {"auto", "none", "all"} & set(trackers)) and len(set(trackers)) == len(trackers), f"{name}.report_to",
                f"must be auto, none or all alone, or tracker names separated by commas, each once ({', '.join(TRACKERS[1:])}); "
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
    # DPM-Solver++ at as many steps as training timesteps repeats the last one and divides by a zero step
    most_steps = ldm.num_train_timesteps - 1
    require(1 <= sample.num_inference_steps <= most_steps, "sample.num_inference_steps",
            f"must be in [1, ldm.num_train_timesteps - 1 = {most_steps}], got {sample.num_inference_steps}")
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
    require(bool(evaluation.tune_steps) and all(1 <= n <= most_steps for n in evaluation.tune_steps),
            "evaluate.tune_steps", f"must be a non-empty list of steps in [1, ldm.num_train_timesteps - 1 = {most_steps}], "
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
