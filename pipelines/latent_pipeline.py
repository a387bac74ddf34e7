"""LatentPipeline: prompt in, images out, following diffusers' DiffusionPipeline conventions.

    pipe = LatentPipeline.from_pretrained("checkpoints/mnist")
    images = pipe("Draw a six", num_images_per_prompt=4, generator=torch.Generator().manual_seed(0)).images

The prompt is encoded by the CLIP text encoder; latents start as Gaussian noise and are denoised by
the UNet with classifier-free guidance (Ho & Salimans 2022) in one batched call per step
[unconditional; conditional]; the VAE decodes latents / scaling_factor to pixels.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel, CLIPTokenizer

from common.errors import RunFolderError
from ldm.text import encode_text


@dataclass
class LatentPipelineOutput(BaseOutput):
    """`images`: a list of PIL images, or an array / tensor (N, H, W, C) / (N, C, H, W), or latents."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor


class LatentPipeline(DiffusionPipeline):
    """Text-to-image latent diffusion with a VAE, a CLIP text encoder, a UNet and a scheduler.

    Args:
        vae: decodes latents to images (`scaling_factor` in its config).
        text_encoder: CLIPTextModel whose token states the UNet cross-attends to.
        tokenizer: the CLIPTokenizer of that text encoder.
        unet: UNet2DConditionModel predicting noise (or v) from noisy latents, timestep and text states.
        scheduler: any diffusers scheduler; DPM-Solver++ by default.
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds", "noise_pred"]

    def __init__(self, vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
                 unet: UNet2DConditionModel, scheduler: KarrasDiffusionSchedulers):
        super().__init__()
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
        if vae is not None and text_encoder is not None and unet is not None:
            check_components(vae, text_encoder, unet)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, do_normalize=True)

    def encode_prompt(self, prompt: list[str], device: torch.device, num_images_per_prompt: int,
                      negative_prompt: list[str] | None, do_classifier_free_guidance: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token states (B * num_images_per_prompt, L, D) for the prompts and, with guidance, the negatives."""
        prompt_embeds = encode_text(self.tokenizer, self.text_encoder, prompt).to(device)
        prompt_embeds = prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
        if not do_classifier_free_guidance:
            return prompt_embeds, None
        negative = negative_prompt if negative_prompt is not None else [""] * len(prompt)
        negative_embeds = encode_text(self.tokenizer, self.text_encoder, negative).to(device)
        return prompt_embeds, negative_embeds.repeat_interleave(num_images_per_prompt, dim=0)

    def prepare_latents(self, batch_size: int, height: int, width: int, dtype: torch.dtype, device: torch.device,
                        generator: torch.Generator | list[torch.Generator] | None,
                        latents: torch.Tensor | None = None) -> torch.Tensor:
        shape = (batch_size, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        else:
            latents = latents.to(device=device, dtype=dtype)
        return latents * self.scheduler.init_noise_sigma

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """(N, C_lat, h, w) scaled latents -> (N, C, H, W) images in [-1, 1]."""
        latents = latents / self.vae.config.scaling_factor
        return self.vae.decode(latents.to(self.vae.dtype)).sample

    def predict_noise(self, latents: torch.Tensor, t: torch.Tensor, prompt_embeds: torch.Tensor,
                      negative_embeds: torch.Tensor | None, guidance_scale: float) -> torch.Tensor:
        """The guided model output: uncond + s * (cond - uncond), both halves in one UNet call."""
        if negative_embeds is None:
            return self.unet(self.scheduler.scale_model_input(latents, t), t, encoder_hidden_states=prompt_embeds).sample
        model_input = self.scheduler.scale_model_input(torch.cat([latents, latents]), t)
        output = self.unet(model_input, t, encoder_hidden_states=torch.cat([negative_embeds, prompt_embeds])).sample
        uncond, cond = output.chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] = "",
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        num_inference_steps: int = 20,
        guidance_scale: float = 4.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[[Any, int, torch.Tensor, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
    ) -> LatentPipelineOutput | tuple:
        """Generate images for one prompt or a list of prompts.

        Args:
            prompt: text(s) to draw; "" gives unconditional samples.
            negative_prompt: what guidance steers away from (default: the empty prompt).
            num_images_per_prompt: images per prompt.
            num_inference_steps: scheduler steps.
            guidance_scale: classifier-free guidance weight; <= 1 disables guidance (conditional only).
            generator: torch.Generator(s) for reproducible noise.
            latents: start from these (B * num_images_per_prompt, C, h, w) noise latents instead.
            height, width: image size in pixels (default: the training size).
            output_type: "pil", "np", "pt" (images in [0, 1]) or "latent".
            return_dict: return a LatentPipelineOutput rather than a tuple.
            callback_on_step_end: `fn(pipe, step_index, timestep, tensors) -> dict` after each step;
                it may return replacements for the tensors named in `callback_on_step_end_tensor_inputs`.

        Returns:
            LatentPipelineOutput with `.images`, or a 1-tuple of the images.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("prompt must be a string or a non-empty list of strings")
        if not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"every prompt must be a string, got {[type(p).__name__ for p in prompts]}")
        if isinstance(negative_prompt, str):
            negative_prompt = [negative_prompt] * len(prompts)
        if negative_prompt is not None and len(negative_prompt) != len(prompts):
            raise ValueError(f"negative_prompt has {len(negative_prompt)} entries for {len(prompts)} prompts")
        if int(num_inference_steps) < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if int(num_images_per_prompt) < 1:
            raise ValueError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
        unknown = set(callback_on_step_end_tensor_inputs) - set(self._callback_tensor_inputs)
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs may name {self._callback_tensor_inputs}, not {sorted(unknown)}")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
        default_size = self.unet.config.sample_size * self.vae_scale_factor
        height, width = height or default_size, width or default_size
        device = self._execution_device
        guided = guidance_scale > 1.0

        prompt_embeds, negative_embeds = self.encode_prompt(prompts, device, num_images_per_prompt, negative_prompt, guided)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        latents = self.prepare_latents(len(prompts) * num_images_per_prompt, height, width, prompt_embeds.dtype,
                                       device, generator, latents)
        # stochastic schedulers (DDPM, Euler ancestral, ...) draw their noise from the same generator
        extra = {"generator": generator} if "generator" in inspect.signature(self.scheduler.step).parameters else {}

        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            noise_pred = self.predict_noise(latents, t, prompt_embeds, negative_embeds, guidance_scale)
            latents = self.scheduler.step(noise_pred, t, latents, **extra).prev_sample
            if callback_on_step_end is not None:
                tensors = {"latents": latents, "prompt_embeds": prompt_embeds, "negative_prompt_embeds": negative_embeds,
                           "noise_pred": noise_pred}
                outputs = callback_on_step_end(self, i, t, {k: tensors[k] for k in callback_on_step_end_tensor_inputs})
                latents = outputs.get("latents", latents) if outputs else latents

        if output_type == "latent":
            images = latents
        else:
            images = self.image_processor.postprocess(self.decode_latents(latents), output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return LatentPipelineOutput(images=images)


def check_components(vae: AutoencoderKL, text_encoder: CLIPTextModel, unet: UNet2DConditionModel) -> None:
    """Refuse components that cannot work together (e.g. folders copied from different runs)."""
    if unet.config.in_channels != vae.config.latent_channels:
        raise RunFolderError(f"the UNet takes {unet.config.in_channels}-channel latents but the VAE makes "
                             f"{vae.config.latent_channels}; unet/ and vae/ come from different runs. Re-run "
                             f"`train-ldm` on this VAE's latents")
    if unet.config.cross_attention_dim != text_encoder.config.hidden_size:
        raise RunFolderError(f"the UNet cross-attends to {unet.config.cross_attention_dim}-d text states but the "
                             f"text encoder makes {text_encoder.config.hidden_size}-d ones; unet/ and text_encoder/ "
                             f"come from different runs. Re-run `train-ldm` with this text encoder")
