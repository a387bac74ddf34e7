"""The arguments of `LatentPipeline.__call__`, checked before any work: each refusal says what to pass instead.

`LatentPipeline.check_inputs` calls `check_call_inputs`. A value that would fail deep inside torch or a
scheduler with a message about something else, or that would be quietly ignored or give wrong images
(a timestep the model never saw, a guidance_rescale of -1 read as 0), is refused here.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any

import torch

from ldm.sampling import NO_INTERVAL, check_scheduler

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
SAMPLING_KEYS = ("num_inference_steps", "guidance_scale", "guidance_interval")  # model_index.json "sampling"


def _count(value: Any) -> bool:
    """A whole number (Python or numpy), not a bool."""
    return isinstance(value, Integral) and not isinstance(value, bool)


def _finite(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def check_schedule(timesteps: list | None, sigmas: list | None, num_train_timesteps: int) -> None:
    """Custom `timesteps` must be whole steps the model was trained on, noisiest first; custom `sigmas` finite,
    non-negative and decreasing. Schedulers take others without a word and sample from states the UNet never saw."""
    if timesteps is not None:
        steps = list(timesteps.tolist() if isinstance(timesteps, torch.Tensor) else timesteps)
        if not steps or not all(_count(t) or (isinstance(t, float) and t.is_integer()) for t in steps) \
                or not all(0 <= t < num_train_timesteps for t in steps) or any(a <= b for a, b in zip(steps, steps[1:])):
            raise ValueError(f"timesteps must be whole numbers in [0, {num_train_timesteps - 1}] (the steps the model was "
                             f"trained on), strictly decreasing (noisiest first), e.g. [999, 749, 499, 249]; got {steps!r}")
    if sigmas is not None:
        values = list(sigmas.tolist() if isinstance(sigmas, torch.Tensor) else sigmas)
        if not values or not all(_finite(s) and s >= 0 for s in values) or any(a <= b for a, b in zip(values, values[1:])):
            raise ValueError(f"sigmas must be finite, non-negative and strictly decreasing (noisiest first), "
                             f"e.g. [14.6, 4.0, 1.0, 0.1]; got {values!r}")


def check_steps(num_inference_steps: Any) -> None:
    if not (_count(num_inference_steps) and num_inference_steps >= 1):
        raise ValueError(f"num_inference_steps must be a whole number >= 1 (e.g. 20), got {num_inference_steps!r}")


def check_guidance(guidance_scale: Any, guidance_interval: Any = NO_INTERVAL) -> None:
    if not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale):
        raise ValueError(f"guidance_scale must be a finite number (e.g. 1.75), got {guidance_scale!r}")
    if not (isinstance(guidance_interval, tuple) and len(guidance_interval) == 2
            and all(isinstance(v, (int, float)) for v in guidance_interval)
            and 0 <= guidance_interval[0] < guidance_interval[1] <= 1):
        raise ValueError(f"guidance_interval must be (start, stop) with 0 <= start < stop <= 1, the fraction of "
                         f"the steps that are guided (e.g. (0.2, 1.0)), got {guidance_interval!r}")


def check_sampling_defaults(sampling: dict) -> None:
    """A run's own sampling defaults (model_index.json "sampling", which README invites editing), checked when the
    pipeline is built: a bad value would otherwise be refused at every call as if the caller had passed it, and a
    misspelt key would be ignored without a word."""
    try:
        unknown = sorted(set(sampling) - set(SAMPLING_KEYS))
        if unknown:
            raise ValueError(f"{', '.join(map(repr, unknown))} {'is not a key' if len(unknown) == 1 else 'are not keys'} "
                             f"of it (its keys: {', '.join(SAMPLING_KEYS)})")
        check_steps(sampling["num_inference_steps"])
        interval = sampling.get("guidance_interval", NO_INTERVAL)
        check_guidance(sampling["guidance_scale"], tuple(interval) if isinstance(interval, list) else interval)
    except ValueError as error:
        raise ValueError(f"the run's sampling defaults (model_index.json \"sampling\") are wrong: {error}; correct "
                         f"them there (evaluate with evaluate.tune: true measures and writes them)") from None


def check_class_table(classes: Any) -> None:
    """A run's class table (model_index.json "classes"), checked when the pipeline is built: an entry without its
    prompt or fields would otherwise stop `write()` and `generate --all-classes` with a bare KeyError or TypeError."""
    wrong = None if isinstance(classes, list) else f"it is {classes!r}"
    for i, entry in enumerate(classes if wrong is None else []):
        if not (isinstance(entry, dict) and isinstance(entry.get("prompt"), str) and isinstance(entry.get("fields"), dict)):
            wrong = wrong or f"entry {i} is {entry!r}"
    if wrong:
        raise ValueError(f"the run's class table (model_index.json \"classes\") is wrong: {wrong}, where it needs a list "
                         f"of {{\"key\", \"fields\", \"prompt\"}} entries as train-ldm writes them; re-run train-ldm, "
                         f"or restore model_index.json")


def check_call_inputs(pipe, prompts: list, negative_prompt: Any, num_inference_steps: Any, num_images_per_prompt: Any,
                      output_type: Any, callback_tensor_inputs: list[str], generator: Any, device: torch.device,
                      guidance_scale: Any = 1.0, height: Any = None, width: Any = None,
                      prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
                      guidance_interval: Any = NO_INTERVAL, latents: torch.Tensor | None = None, eta: Any = 0.0,
                      guidance_rescale: Any = 0.0, timesteps: list | None = None, sigmas: list | None = None) -> None:
    """Refuse arguments that cannot work, saying what to pass instead (see the module's docstring)."""
    if device.type == "meta":  # else torch's "Cannot copy out of meta tensor; no data!" from deep inside the sampler
        raise ValueError("the pipeline is on the meta device (its weights have shapes but no data, e.g. after "
                         "pipe.to('meta')), so it cannot sample; load it again, e.g. LatentPipeline.from_pretrained(run)")
    if prompt_embeds is not None:
        if prompts:
            raise ValueError("pass either prompt or prompt_embeds, not both")
        width_expected = pipe.text_encoder.config.hidden_size
        if prompt_embeds.ndim != 3 or prompt_embeds.shape[-1] != width_expected:
            raise ValueError(f"prompt_embeds must be (batch, tokens, {width_expected}), got {tuple(prompt_embeds.shape)}")
        if negative_prompt_embeds is not None and negative_prompt_embeds.shape != prompt_embeds.shape:
            raise ValueError(f"negative_prompt_embeds {tuple(negative_prompt_embeds.shape)} must have the shape of "
                             f"prompt_embeds {tuple(prompt_embeds.shape)}")
        prompts = [""] * len(prompt_embeds)  # the batch size, for the checks below
    check_guidance(guidance_scale, guidance_interval)
    if not (_finite(guidance_rescale) and 0 <= guidance_rescale <= 1):
        raise ValueError(f"guidance_rescale must be a number in [0, 1] (0: off; Lin et al. suggest 0.7), "
                         f"got {guidance_rescale!r}")
    if not (_finite(eta) and 0 <= eta <= 1):
        raise ValueError(f"eta must be a number in [0, 1] (DDIM's: 0 is deterministic, 1 is as noisy as DDPM), got {eta!r}")
    multiple = pipe.vae_scale_factor * 2 ** (len(pipe.unet.config.block_out_channels) - 1)
    for name, size in (("height", height), ("width", width)):
        if size is not None and (not _count(size) or size <= 0 or size % multiple):
            raise ValueError(f"{name} must be a positive multiple of {multiple} pixels (the VAE's and the "
                             f"UNet's downsampling), got {size!r}; the default is "
                             f"{pipe.unet.config.sample_size * pipe.vae_scale_factor}")
    if not prompts:
        raise ValueError("prompt must be a string or a non-empty list of strings")
    if not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"every prompt must be a string, got {[type(p).__name__ for p in prompts]}")
    if negative_prompt is not None:
        if not isinstance(negative_prompt, (list, tuple)) or not all(isinstance(n, str) for n in negative_prompt):
            raise TypeError(f"negative_prompt must be a string or a list of strings (one per prompt), got {negative_prompt!r}")
        if len(negative_prompt) != len(prompts):
            raise ValueError(f"negative_prompt has {len(negative_prompt)} entries for {len(prompts)} prompts")
    # a lone surrogate (what Python makes of command-line bytes that are not UTF-8) stops the tokenizer with a TypeError
    unencodable = [p for p in [*prompts, *(negative_prompt or [])] if not _utf8(p)]
    if unencodable:
        raise ValueError(f"prompts must be valid Unicode text; {', '.join(map(repr, unencodable))} "
                         f"{'has' if len(unencodable) == 1 else 'have'} characters that are not (on a command line: "
                         f"bytes that are not UTF-8); pass the text in UTF-8")
    if timesteps is None and sigmas is None:
        check_steps(num_inference_steps)
    check_scheduler(pipe.scheduler, getattr(pipe, "trained_schedule", None))
    check_schedule(timesteps, sigmas, pipe.scheduler.config.num_train_timesteps)
    if not (_count(num_images_per_prompt) and num_images_per_prompt >= 1):
        raise ValueError(f"num_images_per_prompt must be a whole number >= 1, got {num_images_per_prompt!r}")
    unknown = set(callback_tensor_inputs) - set(pipe._callback_tensor_inputs)
    if unknown:
        raise ValueError(f"callback_on_step_end_tensor_inputs may name {pipe._callback_tensor_inputs}, not {sorted(unknown)}")
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
    generators = generator if isinstance(generator, list) else [generator] if generator is not None else []
    for g in generators:
        if not hasattr(g, "device"):
            raise TypeError(f"generator must be a torch.Generator (e.g. torch.Generator().manual_seed(0)) or a list of "
                            f"them, one per image; got {type(g).__name__} {g!r}")
        if g.device.type not in ("cpu", device.type):  # a CPU generator works anywhere (noise is moved)
            raise ValueError(f"the generator is on {g.device} but the pipeline runs on {device}; pass "
                             f"torch.Generator('{device.type}') or a CPU generator")
    if isinstance(generator, list) and len(generator) != len(prompts) * num_images_per_prompt:
        raise ValueError(f"got {len(generator)} generators for {len(prompts) * num_images_per_prompt} images")
    if latents is not None and not torch.isfinite(latents).all():
        raise ValueError(f"latents hold {int((~torch.isfinite(latents)).sum())} NaN or infinite values of "
                         f"{latents.numel()}; pass finite starting noise (e.g. torch.randn), or none")
