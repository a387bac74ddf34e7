"""LatentPipeline: prompt in, images out, following diffusers' DiffusionPipeline conventions.

    pipe = LatentPipeline.from_pretrained("checkpoints/mnist")
    images = pipe("Draw a six", num_images_per_prompt=4, generator=torch.Generator().manual_seed(0)).images

The prompt is encoded by the CLIP text encoder; latents start as Gaussian noise and are denoised by
the UNet with classifier-free guidance (Ho & Salimans 2022) in one batched call per step
[unconditional; conditional]; the VAE decodes latents / scaling_factor to pixels.
"""

from __future__ import annotations

import inspect
import json
import os
from dataclasses import dataclass
from pathlib import Path
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

from common.checkpoint import write_text
from common.errors import RunFolderError
from ldm.text import encode_text


CLASSES_FILE = "classes.json"  # the class table of a class dataset: what write() draws for each character


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
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds", "noise_pred", "pred_original_sample"]

    def __init__(self, vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
                 unet: UNet2DConditionModel, scheduler: KarrasDiffusionSchedulers):
        super().__init__()
        self.classes: list[dict] = []  # [{"key", "fields", "prompt"}] of a class dataset, from classes.json
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
        if vae is not None and text_encoder is not None and unet is not None:
            check_components(vae, text_encoder, unet)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, do_normalize=True)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> "LatentPipeline":
        """Load a run folder. Weights are read from safetensors only: a pickle planted beside them is never
        unpickled (pass use_safetensors=False explicitly to allow .bin files you trust)."""
        kwargs.setdefault("use_safetensors", True)
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        classes_file = Path(pretrained_model_name_or_path) / CLASSES_FILE
        if classes_file.is_file():
            pipe.classes = json.loads(classes_file.read_text(encoding="utf-8"))
        return pipe

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        super().save_pretrained(save_directory, **kwargs)
        if self.classes:
            write_text(Path(save_directory) / CLASSES_FILE, json.dumps(self.classes, ensure_ascii=False, indent=1))

    # ---- writing a line of glyphs (one per character), for class datasets of characters ------------

    def segment(self, text: str) -> list[int | None]:
        """Class indices for the characters of `text` (None for a space).

        Accepts the classes' symbols ("2026", "कक्ष", conjuncts matched whole) or, separated by spaces,
        their romanized names ("ka kha ksha", "two zero").
        """
        if not self.classes:
            raise ValueError("this pipeline has no class list (classes.json); write() needs a class dataset of characters")
        names = {}
        for k, c in enumerate(self.classes):
            for field in ("name", "alias"):
                if c["fields"].get(field):
                    names.setdefault(c["fields"][field].lower(), k)
        words = text.split()
        if words and all(w.lower() in names for w in words):
            return [names[w.lower()] for w in words]
        symbols = {c["fields"]["symbol"]: k for k, c in enumerate(self.classes) if c["fields"].get("symbol")}
        longest = max(map(len, symbols), default=1)
        glyphs, i = [], 0
        while i < len(text):
            if text[i].isspace():
                glyphs.append(None)
                i += 1
                continue
            match = next((text[i:i + n] for n in range(longest, 0, -1) if text[i:i + n] in symbols), None)
            if match is None:
                raise ValueError(f"no class draws {text[i]!r} (in {text!r}). Known characters: {' '.join(symbols)}; "
                                 f"or write romanized names separated by spaces: {' '.join(sorted(names))}")
            glyphs.append(symbols[match])
            i += len(match)
        return glyphs

    @torch.no_grad()
    def write(self, text: str, num_inference_steps: int = 20, guidance_scale: float = 4.0,
              generator: torch.Generator | None = None, gap: int = 0) -> PIL.Image.Image:
        """One generated glyph per character of `text`, side by side, evenly spaced, on one line.

        All glyphs come from one batched call, so one `generator` seed fixes the whole line.
        """
        glyphs = self.segment(text)
        prompts = [self.classes[k]["prompt"] for k in glyphs if k is not None]
        images = self(prompts, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                      generator=generator).images if prompts else []
        size = self.unet.config.sample_size * self.vae_scale_factor
        mode = images[0].mode if images else "L"
        line = PIL.Image.new(mode, (len(glyphs) * size + (len(glyphs) - 1) * gap, size), 0)
        drawn = iter(images)
        for position, k in enumerate(glyphs):
            if k is not None:
                line.paste(next(drawn), (position * (size + gap), 0))
        return line

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

    def predicted_clean_latents(self, step_output: Any, latents: torch.Tensor, model_output: torch.Tensor,
                                t: torch.Tensor) -> torch.Tensor:
        """The step's prediction of the clean latents x0 (what the denoising animation shows).

        Schedulers that report it (DDPM, DDIM, Euler, ...) are taken at their word; multistep solvers
        keep their data prediction in `model_outputs`; otherwise x0 follows from the VP parametrisation.
        """
        x0 = getattr(step_output, "pred_original_sample", None)
        if x0 is None and getattr(self.scheduler, "model_outputs", None) and self.scheduler.model_outputs[-1] is not None \
                and getattr(self.scheduler.config, "algorithm_type", "dpmsolver++") in ("dpmsolver++", "sde-dpmsolver++"):
            x0 = self.scheduler.model_outputs[-1]
        if x0 is None:
            alpha_bar = self.scheduler.alphas_cumprod.to(latents.device)[int(t)]
            alpha, sigma = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
            if self.scheduler.config.prediction_type == "v_prediction":
                x0 = alpha * latents - sigma * model_output
            else:
                x0 = (latents - sigma * model_output) / alpha
        return x0

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

        generators = generator if isinstance(generator, list) else [generator] if generator is not None else []
        for g in generators:
            if g.device.type not in ("cpu", device.type):  # a CPU generator works anywhere (noise is moved)
                raise ValueError(f"the generator is on {g.device} but the pipeline runs on {device}; pass "
                                 f"torch.Generator('{device.type}') or a CPU generator")
        if isinstance(generator, list) and len(generator) != len(prompts) * num_images_per_prompt:
            raise ValueError(f"got {len(generator)} generators for {len(prompts) * num_images_per_prompt} images")

        prompt_embeds, negative_embeds = self.encode_prompt(prompts, device, num_images_per_prompt, negative_prompt, guided)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        latents = self.prepare_latents(len(prompts) * num_images_per_prompt, height, width, prompt_embeds.dtype,
                                       device, generator, latents)
        # stochastic schedulers (DDPM, Euler ancestral, ...) draw their noise from the same generator
        extra = {"generator": generator} if "generator" in inspect.signature(self.scheduler.step).parameters else {}

        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            noise_pred = self.predict_noise(latents, t, prompt_embeds, negative_embeds, guidance_scale)
            step = self.scheduler.step(noise_pred, t, latents, **extra)
            if callback_on_step_end is not None:
                tensors = {"latents": step.prev_sample, "prompt_embeds": prompt_embeds,
                           "negative_prompt_embeds": negative_embeds, "noise_pred": noise_pred}
                if "pred_original_sample" in callback_on_step_end_tensor_inputs:
                    tensors["pred_original_sample"] = self.predicted_clean_latents(step, latents, noise_pred, t)
                outputs = callback_on_step_end(self, i, t, {k: tensors[k] for k in callback_on_step_end_tensor_inputs})
                latents = outputs.get("latents", step.prev_sample) if outputs else step.prev_sample
            else:
                latents = step.prev_sample

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
