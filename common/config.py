"""Typed configuration: one dataclass per stage, loaded from `configs/*.yaml`, overridden with `--set`.

Every command reads the same experiment file (`--config configs/mnist.yaml`), applies any number of
`--set key.path=value` overrides, checks every key and type, prints the result and saves it as
`run/config.yaml`. Unknown keys and wrong types are errors that name the key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
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
    # deterministic kernels in the training stages: on a GPU, bit-identical reruns of one seed (slower); a CPU's repeat anyway.
    # Strict: an op with no deterministic kernel stops the stage (common/devices.py use_deterministic_kernels)
    deterministic: bool = False
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


def dump_config(config: Config | dict) -> str:  # a Config, or one as a dict (`to_dict`)
    return yaml.safe_dump(to_dict(config) if dataclasses.is_dataclass(config) else config, sort_keys=False,
                          default_flow_style=None, width=100)
