"""Sampling latents from text: classifier-free guided denoising with any diffusers scheduler.

Stage two owns this so that training previews need no pipeline; `LatentPipeline` (pipelines/) wraps
the same functions with diffusers' argument conventions. Guidance follows Ho & Salimans 2022:
uncond + s * (cond - uncond), both halves in one batched UNet call per step, optionally only in an
interval of the steps (Kynkäänniemi et al. 2024, "Applying guidance in a limited interval improves
sample and distribution quality"): the other steps take the conditional output alone, at half the cost.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Iterable

import PIL.Image
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel, CLIPTokenizer

from ldm.text import encode_text

# What a run samples with when neither the caller nor the run (model_index.json "sampling") says:
# runs trained before the run's own defaults were recorded
FALLBACK_SAMPLING = {"num_inference_steps": 20, "guidance_scale": 4.0}
NO_INTERVAL = (0.0, 1.0)  # guidance at every step

# called after each step with (step index, timestep, the scheduler's step output, latents before the
# step, guided model output); returns replacements (or None): "latents", "prompt_embeds", "negative_prompt_embeds"
StepHook = Callable[[int, torch.Tensor, Any, torch.Tensor, torch.Tensor], dict | None]


def encode_prompts(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, prompts: list[str], device: torch.device,
                   num_images_per_prompt: int, guided: bool, negative_prompts: list[str] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token states (B * num_images_per_prompt, L, D) for the prompts and, with guidance, the negatives
    (the empty prompt by default)."""
    prompt_embeds = encode_text(tokenizer, text_encoder, prompts).to(device)
    prompt_embeds = prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
    if not guided:
        return prompt_embeds, None
    negative = negative_prompts if negative_prompts is not None else [""] * len(prompts)
    negative_embeds = encode_text(tokenizer, text_encoder, negative).to(device)
    return prompt_embeds, negative_embeds.repeat_interleave(num_images_per_prompt, dim=0)


def initial_latents(scheduler, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                    generator: torch.Generator | list[torch.Generator] | None,
                    latents: torch.Tensor | None = None) -> torch.Tensor:
    """Gaussian noise of `shape` (B, C, h, w), or the given `latents`, scaled to the scheduler's first sigma."""
    if latents is None:
        latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
    elif tuple(latents.shape) != tuple(shape):
        raise ValueError(f"latents must have shape {tuple(shape)}, got {tuple(latents.shape)}")
    else:
        latents = latents.to(device=device, dtype=dtype)
    return latents * scheduler.init_noise_sigma


def guided_prediction(unet: UNet2DConditionModel, scheduler, latents: torch.Tensor, t: torch.Tensor,
                      prompt_embeds: torch.Tensor, negative_embeds: torch.Tensor | None,
                      guidance_scale: float, guidance_rescale: float = 0.0,
                      unet_timestep: torch.Tensor | None = None) -> torch.Tensor:
    """The guided model output: uncond + s * (cond - uncond); the conditional one alone without negatives.
    `guidance_rescale` > 0 pulls its std back towards the conditional output's (Lin et al. 2024, section 3.4).
    `unet_timestep`: the UNet's copy of the timestep `t`, on the latents' device (default: `t` itself)."""
    unet_timestep = t if unet_timestep is None else unet_timestep
    if negative_embeds is None:
        return unet(scheduler.scale_model_input(latents, t), unet_timestep, encoder_hidden_states=prompt_embeds).sample
    model_input = scheduler.scale_model_input(torch.cat([latents, latents]), t)
    output = unet(model_input, unet_timestep, encoder_hidden_states=torch.cat([negative_embeds, prompt_embeds])).sample
    uncond, cond = output.chunk(2)
    guided = uncond + guidance_scale * (cond - uncond)
    return rescale_noise_cfg(guided, cond, guidance_rescale) if guidance_rescale > 0 else guided


def predicted_clean_latents(scheduler, step_output: Any, latents: torch.Tensor, model_output: torch.Tensor,
                            t: torch.Tensor) -> torch.Tensor:
    """The step's prediction of the clean latents x0 (what the denoising animation shows).

    Schedulers that report it (DDPM, DDIM, Euler, ...) are taken at their word; multistep solvers
    keep their data prediction in `model_outputs`; otherwise x0 follows from the VP parametrisation.
    """
    x0 = getattr(step_output, "pred_original_sample", None)
    if x0 is None and getattr(scheduler, "model_outputs", None) and scheduler.model_outputs[-1] is not None \
            and getattr(scheduler.config, "algorithm_type", "dpmsolver++") in ("dpmsolver++", "sde-dpmsolver++"):
        x0 = scheduler.model_outputs[-1]
    if x0 is None:
        alpha_bar = scheduler.alphas_cumprod.to(latents.device)[int(t)]
        alpha, sigma = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        if scheduler.config.prediction_type == "v_prediction":
            x0 = alpha * latents - sigma * model_output
        else:
            x0 = (latents - sigma * model_output) / alpha
    return x0


def guided_steps(num_steps: int, guidance_interval: tuple[float, float] = NO_INTERVAL) -> range:
    """The step indices that are guided: [int(start * N), int(stop * N)), as diffusers' guiders count them
    (`diffusers.guiders.ClassifierFreeGuidance(start=..., stop=...)`); step 0 is the noisiest."""
    start, stop = guidance_interval
    return range(int(start * num_steps), int(stop * num_steps))


# what of a scheduler's config the UNet was trained with: its noise schedule and what it predicts
TRAINED_SCHEDULE_KEYS = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "trained_betas",
                         "prediction_type")


def trained_schedule(scheduler_config) -> dict:
    """The `TRAINED_SCHEDULE_KEYS` of a scheduler's config (those it has): its `.config`, or its saved
    scheduler_config.json read as a dict."""
    return {key: scheduler_config[key] for key in TRAINED_SCHEDULE_KEYS if key in scheduler_config}


def check_scheduler(scheduler, trained: dict | None = None) -> None:
    """Raise ValueError for a scheduler that cannot sample this model. An inverse scheduler runs from an image to
    noise, and one without the discrete-time noise schedule (`alphas_cumprod`) the model was trained on is made for
    other models (flow matching, EDM): the first and EDM's draw noise without a word, flow matching fails deep inside
    (no `init_noise_sigma`). With `trained` (`trained_schedule` of the scheduler the model came with), one made with
    another noise schedule or prediction type (`EulerDiscreteScheduler()` instead of `.from_config(...)`) draws
    noise too."""
    name = type(scheduler).__name__
    if "Inverse" in name:
        raise ValueError(f"{name} runs from an image to noise (to invert an image), not from noise to an image; to "
                         f"sample, use the scheduler it inverts: pipe.scheduler = "
                         f"{name.replace('Inverse', '')}.from_config(pipe.scheduler.config)")
    if not hasattr(scheduler, "alphas_cumprod"):
        raise ValueError(f"{name} is made for models trained on another noise schedule (flow matching, EDM), not "
                         f"this model's discrete-time one; use a scheduler that has it, e.g. pipe.scheduler = "
                         f"EulerDiscreteScheduler.from_config(pipe.scheduler.config) (or DDIM, UniPC, DPM-Solver++)")
    differ = {key: value for key, value in trained_schedule(scheduler.config).items()
              if key in (trained or {}) and value != trained[key]}
    if differ:
        raise ValueError(f"{name} has {', '.join(f'{k}={v!r}' for k, v in differ.items())}, but this model was "
                         f"trained with {', '.join(f'{k}={trained[k]!r}' for k in differ)}: sampling on another "
                         f"noise schedule or prediction type gives degraded images or noise; make it from the model's "
                         f"scheduler config (pipe.scheduler = {name}.from_config(pipe.scheduler.config), before "
                         f"replacing it) or pass those values")


def schedule_steps(scheduler) -> list[float]:
    """The timesteps of the steps the scheduler was set to (one per `num_inference_steps`), without the extra
    model calls some schedulers list by design: second-order ones (Heun, KDPM2) a second stage after every step
    but the first (Heun at the same timestep, KDPM2 at one between two steps), PNDM its Runge-Kutta warm-up."""
    if hasattr(scheduler, "prk_timesteps"):  # PNDM: its own steps, before the warm-up's repeats are added
        return list(scheduler._timesteps)
    timesteps = scheduler.timesteps.tolist()
    return timesteps[0::2] if hasattr(scheduler, "state_in_first_order") else timesteps


def check_distinct_timesteps(scheduler) -> None:
    """Raise ValueError when the scheduler's steps (set with `set_timesteps`) repeat a timestep: more steps than the
    model was trained on, where multistep solvers divide by a zero step. The extra model calls that second-order
    schedulers and PNDM list by design are not counted (`schedule_steps`)."""
    steps_taken = schedule_steps(scheduler)
    steps = len(steps_taken)
    repeated = steps - len(set(steps_taken))
    if repeated:
        raise ValueError(f"{type(scheduler).__name__} with {steps} steps repeats {repeated} timestep(s) "
                         f"(the model was trained on {scheduler.config.num_train_timesteps}), which breaks the "
                         f"sampler; use fewer steps (e.g. {steps - repeated - 1})")


@torch.no_grad()
def denoise(unet: UNet2DConditionModel, scheduler, latents: torch.Tensor, prompt_embeds: torch.Tensor,
            negative_embeds: torch.Tensor | None, guidance_scale: float,
            generator: torch.Generator | list[torch.Generator] | None = None, on_step: StepHook | None = None,
            progress: Callable[[Iterable], Iterable] = lambda steps: steps, eta: float = 0.0,
            guidance_rescale: float = 0.0, guidance_interval: tuple[float, float] = NO_INTERVAL) -> torch.Tensor:
    """Run the scheduler's timesteps (set beforehand with `set_timesteps`) from noisy `latents` to clean ones.
    Guidance applies at the steps `guided_steps(len(timesteps), guidance_interval)` only.

    Raises ValueError when the schedule repeats a timestep (multistep solvers then divide by a zero
    step) and FloatingPointError when the result is not finite: never NaN images without a word.
    The scheduler's timesteps are left on the host; `on_step` gets the host timestep.
    """
    # The schedule stays on the host and the UNet reads one copy of it on the latents' device, made here once.
    # set_timesteps(device=...) puts the timesteps on the GPU, and diffusers' DDIM and DDPM then read the step's
    # timestep back on the host at every step (`prev_timestep >= 0`, `(self.timesteps == t).nonzero()`), waiting
    # for the GPU each time; the schedulers keep their sigmas on the host for that reason already ("to avoid too
    # much CPU/GPU communication"). Host scalars in a device computation are kernel arguments: no copy, no wait.
    scheduler.timesteps = timesteps = scheduler.timesteps.cpu()
    unet_timesteps = timesteps.to(latents.device)
    check_distinct_timesteps(scheduler)
    # stochastic schedulers (DDPM, Euler ancestral, ...) draw their noise from the same generator; DDIM takes eta
    accepts = inspect.signature(scheduler.step).parameters
    extra = {k: v for k, v in (("generator", generator), ("eta", eta)) if k in accepts}
    guided = guided_steps(len(timesteps), guidance_interval)
    for i, (t, unet_timestep) in enumerate(zip(progress(timesteps), unet_timesteps)):
        model_output = guided_prediction(unet, scheduler, latents, t, prompt_embeds, negative_embeds if i in guided
                                         else None, guidance_scale, guidance_rescale, unet_timestep)
        step = scheduler.step(model_output, t, latents, **extra)
        before, latents = latents, step.prev_sample
        if on_step is not None:
            updates = on_step(i, t, step, before, model_output) or {}
            latents = updates.get("latents", latents)
            prompt_embeds = updates.get("prompt_embeds", prompt_embeds)
            negative_embeds = updates.get("negative_prompt_embeds", negative_embeds)
    if not torch.isfinite(latents).all():
        raise FloatingPointError(f"sampling gave non-finite latents ({type(scheduler).__name__}, {len(timesteps)} steps, "
                                 f"guidance {guidance_scale}); try fewer steps, another scheduler or a lower guidance scale")
    return latents


@torch.no_grad()
def decode_latents(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """(N, C_lat, h, w) scaled latents -> (N, C, H, W) images in [-1, 1]."""
    return vae.decode((latents / vae.config.scaling_factor).to(vae.dtype)).sample


@torch.no_grad()
def sample_images(vae: AutoencoderKL, tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel,
                  unet: UNet2DConditionModel, scheduler, prompts: list[str], num_images_per_prompt: int,
                  num_inference_steps: int, guidance_scale: float, generator: torch.Generator) -> list[PIL.Image.Image]:
    """Prompts -> PIL images, `num_images_per_prompt` each in prompt order (training's preview grids)."""
    device = unet.device
    guided = guidance_scale > 1.0
    prompt_embeds, negative_embeds = encode_prompts(tokenizer, text_encoder, prompts, device, num_images_per_prompt, guided)
    scheduler.set_timesteps(num_inference_steps, device=device)
    size = unet.config.sample_size
    shape = (len(prompts) * num_images_per_prompt, unet.config.in_channels, size, size)
    latents = initial_latents(scheduler, shape, prompt_embeds.dtype, device, generator)
    latents = denoise(unet, scheduler, latents, prompt_embeds, negative_embeds, guidance_scale, generator)
    return VaeImageProcessor().postprocess(decode_latents(vae, latents), output_type="pil")
