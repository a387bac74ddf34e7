"""Stage two's models: diffusers' UNet2DConditionModel and the noise schedulers."""

from __future__ import annotations

from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel

from common.config import LDMConfig

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


def build_noise_scheduler(config: LDMConfig) -> DDPMScheduler:
    beta_start, beta_end = BETA_RANGES[config.beta_schedule]
    return DDPMScheduler(num_train_timesteps=config.num_train_timesteps, beta_schedule=config.beta_schedule,
                         beta_start=beta_start, beta_end=beta_end, prediction_type=config.prediction_type,
                         clip_sample=False, steps_offset=1)


def inference_scheduler(noise_scheduler: DDPMScheduler) -> DPMSolverMultistepScheduler:
    """DPM-Solver++ (Lu et al. 2022), 2nd order: good images in ~20 steps, same noise schedule as training."""
    return DPMSolverMultistepScheduler.from_config(noise_scheduler.config, algorithm_type="dpmsolver++", solver_order=2)
