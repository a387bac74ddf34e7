"""Stage two's models: diffusers' UNet2DConditionModel and the noise schedulers."""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel
from diffusers.training_utils import compute_snr

from common.config import LDMConfig
from common.errors import UserError
from common.pretrained import adopt_architecture, load_diffusers_model

# beta_start/beta_end of the two linear schedules: DDPM (Ho et al. 2020) and Stable Diffusion's
BETA_RANGES = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012), "squaredcos_cap_v2": (1e-4, 0.02)}


def build_unet(config: LDMConfig, latent_channels: int, latent_size: int, cross_attention_dim: int) -> UNet2DConditionModel:
    """A text-conditioned UNet on (latent_channels, latent_size, latent_size) latents.

    Levels with `cross_attention` true get a transformer block (self-attention + cross-attention on
    the text encoder's token states, as in Stable Diffusion); the middle block always has one.
    """
    down = tuple("CrossAttnDownBlock2D" if attend else "DownBlock2D" for attend in config.cross_attention)
    up = tuple("CrossAttnUpBlock2D" if attend else "UpBlock2D" for attend in reversed(config.cross_attention))
    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=tuple(config.block_out_channels),
        layers_per_block=config.layers_per_block,
        cross_attention_dim=cross_attention_dim,
        # diffusers reads `attention_head_dim` as the number of heads in this model (a known naming quirk)
        attention_head_dim=config.attention_heads,
        norm_num_groups=config.norm_num_groups,
    )


def initial_unet(config: LDMConfig, latent_channels: int, latent_size: int,
                 cross_attention_dim: int) -> tuple[UNet2DConditionModel, str]:
    """The UNet a run starts from: `ldm.init_from`'s (fine-tuning; its architecture replaces the config's)
    or a new one. A UNet for other latents or another text encoder, or trained with another noise
    schedule or prediction type, is refused. Returns it and a line for the log."""
    if not config.init_from:
        return build_unet(config, latent_channels, latent_size, cross_attention_dim), "new weights"
    unet, folder = load_diffusers_model(UNet2DConditionModel, config.init_from, "unet", "ldm.init_from")
    c = unet.config
    if c.in_channels != latent_channels or c.out_channels != latent_channels:
        raise UserError(f"ldm.init_from: the UNet in {folder} denoises {c.in_channels}-channel latents, but this run's "
                        f"VAE makes {latent_channels}-channel ones; start the run's VAE from the same base "
                        f"(vae.init_from) or train a UNet from scratch")
    if c.cross_attention_dim != cross_attention_dim:
        raise UserError(f"ldm.init_from: the UNet in {folder} reads {c.cross_attention_dim}-wide text states, but this "
                        f"run's text encoder gives {cross_attention_dim}; use the base's text encoder "
                        f"(text_encoder.pretrained={config.init_from}, or clip.init_from)")
    blocks = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
    if any(t not in blocks for t in c.down_block_types):
        raise UserError(f"ldm.init_from: the UNet in {folder} has blocks {c.down_block_types}; this toolkit trains "
                        f"UNets of {' and '.join(blocks)} only")
    schedule = folder.parent / "scheduler" / "scheduler_config.json"
    if schedule.is_file():  # a run or pipeline folder: the UNet learned this schedule's targets
        saved = json.loads(schedule.read_text(encoding="utf-8"))
        for key in ("prediction_type", "beta_schedule", "num_train_timesteps"):
            if key in saved and saved[key] != getattr(config, key):
                raise UserError(f"ldm.init_from: the UNet in {folder} was trained with {key}={saved[key]!r} ({schedule}), "
                                f"but ldm.{key} is {getattr(config, key)!r}; set ldm.{key}={saved[key]}")
    heads = c.attention_head_dim
    note = adopt_architecture(config, {
        "block_out_channels": list(c.block_out_channels), "layers_per_block": c.layers_per_block,
        "cross_attention": [blocks[t] for t in c.down_block_types], "norm_num_groups": c.norm_num_groups,
        **({"attention_heads": heads} if isinstance(heads, int) else {})}, "ldm")
    levels = 2 ** (len(c.block_out_channels) - 1)
    if latent_size % levels:
        raise UserError(f"ldm.init_from: the UNet in {folder} has {len(c.block_out_channels)} levels, so the latent size "
                        f"must be a multiple of {levels}; this run's latents are {latent_size}x{latent_size}")
    unet.register_to_config(sample_size=latent_size)
    return unet, f"weights from {folder} ({note})"


def build_noise_scheduler(config: LDMConfig) -> DDPMScheduler:
    beta_start, beta_end = BETA_RANGES[config.beta_schedule]
    return DDPMScheduler(num_train_timesteps=config.num_train_timesteps, beta_schedule=config.beta_schedule,
                         beta_start=beta_start, beta_end=beta_end, prediction_type=config.prediction_type,
                         clip_sample=False, steps_offset=1)


def inference_scheduler(noise_scheduler: DDPMScheduler) -> DPMSolverMultistepScheduler:
    """DPM-Solver++ (Lu et al. 2022), 2nd order: good images in ~20 steps, same noise schedule as training."""
    return DPMSolverMultistepScheduler.from_config(noise_scheduler.config, algorithm_type="dpmsolver++", solver_order=2)


def min_snr_weights(noise_scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023): min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for v."""
    if gamma <= 0:
        return torch.ones_like(timesteps, dtype=torch.float32)
    snr = compute_snr(noise_scheduler, timesteps)
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr


def training_timesteps(count: int, config: LDMConfig, device: torch.device) -> torch.Tensor:
    """(count,) integer timesteps in [0, num_train_timesteps): uniform, or t = T * sigmoid(n), n ~ N(0, 1)."""
    if config.timestep_sampling == "logit_normal":
        fraction = torch.sigmoid(torch.randn(count, device=device))
        return (fraction * config.num_train_timesteps).long().clamp_max(config.num_train_timesteps - 1)
    return torch.randint(0, config.num_train_timesteps, (count,), device=device)


def diffusion_loss(unet: torch.nn.Module, noise_scheduler: DDPMScheduler, latents: torch.Tensor,
                   text_states: torch.Tensor, config: LDMConfig) -> torch.Tensor:
    """The denoising objective for one batch: latents (B, C, h, w), text states (B, L, D) -> scalar.

    Noise the latents to random timesteps and regress the UNet's output on the noise (epsilon) or
    on v = alpha * noise - sigma * x0 (Salimans & Ho 2022), optionally min-SNR weighted.
    """
    noise = torch.randn_like(latents)
    if config.offset_noise > 0:  # a per-channel constant, so the model can change mean brightness
        noise = noise + config.offset_noise * torch.randn(*latents.shape[:2], 1, 1, device=latents.device)
    timesteps = training_timesteps(len(latents), config, latents.device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    target = noise if config.prediction_type == "epsilon" else noise_scheduler.get_velocity(latents, noise, timesteps)
    prediction = unet(noisy, timesteps, encoder_hidden_states=text_states).sample
    loss = F.mse_loss(prediction.float(), target.float(), reduction="none").mean((1, 2, 3))  # (B,)
    return (loss * min_snr_weights(noise_scheduler, timesteps, config.snr_gamma, config.prediction_type)).mean()
