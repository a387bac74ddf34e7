"""LatentPipeline: prompt in, images out, following diffusers' DiffusionPipeline conventions.

    pipe = LatentPipeline.from_pretrained("checkpoints/mnist")
    images = pipe("Draw a six", num_images_per_prompt=4, generator=torch.Generator().manual_seed(0)).images

The prompt is encoded by the CLIP text encoder; latents start as Gaussian noise and are denoised by
the UNet with classifier-free guidance (Ho & Salimans 2022) in one batched call per step
[unconditional; conditional] (`ldm.sampling`); the VAE decodes latents / scaling_factor to pixels.
The run's class table is part of the pipeline's config (`model_index.json`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput
from transformers import CLIPTextModel, CLIPTokenizer

from common.checkpoint import check_weights, folder_fingerprint, writable_folder
from common.pretrained import forget_source_path
from common.run import WRITTEN_BY, RunFolder
from ldm.lora import (adapted_layers, check_adapter_base, keep_unfused, local_source, missing_source,
                       restore_unfused, safetensors_only)
from ldm.text import check_tokenizer
from ldm.sampling import (FALLBACK_SAMPLING, NO_INTERVAL, decode_latents, denoise, encode_prompts, guided_prediction,
                          initial_latents, predicted_clean_latents, trained_schedule)
from pipelines.call_checks import check_call_inputs, check_class_table, check_sampling_defaults
from pipelines.glyphs import LineLayout, lay_out_line, segment
from pipelines.run_checks import (check_all_weights_saved, check_built_from, check_components, check_savable,
                                  remove_stale_shard_index, run_trained_schedule)

LEGACY_CLASSES_FILE = "classes.json"  # where runs before the class table moved into model_index.json kept it


@dataclass
class LatentPipelineOutput(BaseOutput):
    """`images`: a list of PIL images, or an array / tensor (N, H, W, C) / (N, C, H, W), or latents."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor


class LatentPipeline(DiffusionPipeline, StableDiffusionLoraLoaderMixin):
    """Text-to-image latent diffusion with a VAE, a CLIP text encoder, a UNet and a scheduler.

    LoRA adapters in diffusers' format (what `train-ldm` with `ldm.lora_rank` writes) load with
    `load_lora_weights(folder)` (from safetensors only: a pickled `.bin` is refused; adapters trained on another
    UNet than this pipeline's are refused too), and
    `unload_lora_weights()` / `fuse_lora()` work as in Stable Diffusion (`unfuse_lora()` restores the weights exactly).

    Args:
        vae: decodes latents to images (`scaling_factor` in its config).
        text_encoder: CLIPTextModel whose token states the UNet cross-attends to.
        tokenizer: the CLIPTokenizer of that text encoder.
        unet: UNet2DConditionModel predicting noise (or v) from noisy latents, timestep and text states.
        scheduler: any diffusers scheduler; DPM-Solver++ by default.
        classes: the class table of a class dataset, `[{"key", "fields", "prompt"}]` (what `write()` draws).
        built_from: hashes of the `vae`, `text_encoder` and `tokenizer` folders the UNet was trained with
            (runs before the tokenizer's was kept: the first two), and of the `unet` folder written with
            this index (older runs: none); loading a folder whose components no longer match them is refused.
        sampling: the run's tuned defaults, `{"num_inference_steps", "guidance_scale"}`: what `__call__`
            and `write` use when the caller passes none.
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds", "noise_pred", "pred_original_sample"]

    def __init__(self, vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
                 unet: UNet2DConditionModel, scheduler: KarrasDiffusionSchedulers, classes: list[dict] | None = None,
                 built_from: dict | None = None, sampling: dict | None = None):
        super().__init__()
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
        check_class_table(classes if classes is not None else [])
        self.register_to_config(classes=list(classes or []), built_from=dict(built_from or {}),
                                sampling={**FALLBACK_SAMPLING, **(sampling or {})})
        check_sampling_defaults(self.config.sampling)
        if vae is not None and text_encoder is not None and unet is not None:
            check_components(vae, text_encoder, unet)
        if tokenizer is not None and text_encoder is not None:
            check_tokenizer(tokenizer, text_encoder)
        # the noise schedule and prediction type the UNet was trained with, as its scheduler has them: a scheduler
        # swapped in later with others (made without from_config) is refused at sampling (ldm.sampling.check_scheduler)
        self.trained_schedule = trained_schedule(scheduler.config) if scheduler is not None else None
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, do_normalize=True)

    @property
    def classes(self) -> list[dict]:
        return list(self.config.classes)

    @classes.setter
    def classes(self, value: list[dict]) -> None:
        self.register_to_config(classes=list(value))

    def sampling_defaults(self, num_inference_steps: int | None = None, guidance_scale: float | None = None) -> tuple[int, float]:
        """The caller's values where given, else the run's own (model_index.json "sampling")."""
        return (num_inference_steps if num_inference_steps is not None else self.config.sampling["num_inference_steps"],
                guidance_scale if guidance_scale is not None else self.config.sampling["guidance_scale"])

    def default_guidance_interval(self, guidance_interval: tuple[float, float] | None = None) -> tuple[float, float]:
        """The caller's interval if given, else the run's own (runs made before it was recorded: every step)."""
        chosen = guidance_interval if guidance_interval is not None else self.config.sampling.get("guidance_interval", NO_INTERVAL)
        return tuple(chosen) if isinstance(chosen, (list, tuple)) else chosen  # anything else: check_inputs says so

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> "LatentPipeline":
        """Load a run folder. Weights are read from safetensors only: a pickle planted beside them is never
        unpickled (pass use_safetensors=False explicitly to allow .bin files you trust)."""
        kwargs.setdefault("use_safetensors", True)
        if Path(pretrained_model_name_or_path).expanduser().exists():  # else a name in the Hugging Face cache
            # `~` expanded here: diffusers would read '~/run' as a Hub repo id and refuse its characters
            pretrained_model_name_or_path = Path(pretrained_model_name_or_path).expanduser()
            RunFolder(pretrained_model_name_or_path).check_loadable(tuple(cls._get_signature_keys(cls)[0]))
            for name, command in WRITTEN_BY.items():
                check_weights(Path(pretrained_model_name_or_path) / name, command)
        try:
            pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        except (OSError, ValueError) as error:  # a mistyped run folder would read as a failed Hub lookup
            if Path(pretrained_model_name_or_path).expanduser().exists():
                raise
            raise FileNotFoundError(
                f"no run folder '{pretrained_model_name_or_path}' (and no model of that name in the Hugging Face "
                f"cache): pass the folder train-ldm wrote (it holds model_index.json), e.g. "
                f"LatentPipeline.from_pretrained('checkpoints/mnist')") from error
        check_built_from(Path(pretrained_model_name_or_path), pipe.config.built_from)
        for model in (pipe.vae, pipe.unet):  # else save_pretrained writes the source's path into their config.json
            forget_source_path(model)
        check_all_weights_saved(Path(pretrained_model_name_or_path), pipe, exclude=kwargs)
        if "scheduler" in kwargs:  # the caller's scheduler is checked against the run's own
            pipe.trained_schedule = run_trained_schedule(Path(pretrained_model_name_or_path)) or pipe.trained_schedule
        legacy = Path(pretrained_model_name_or_path) / LEGACY_CLASSES_FILE
        if not pipe.classes and legacy.is_file():
            pipe.classes = json.loads(legacy.read_text(encoding="utf-8"))
        return pipe

    @classmethod
    def from_pipe(cls, pipeline: DiffusionPipeline, **kwargs) -> "LatentPipeline":
        """diffusers' from_pipe, keeping the trained schedule of `pipeline`'s UNet, so that a scheduler passed in is
        checked against it (not taken for it)."""
        pipe = super().from_pipe(pipeline, **kwargs)
        if getattr(pipeline, "trained_schedule", None) and "unet" not in kwargs:
            pipe.trained_schedule = pipeline.trained_schedule
        return pipe

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name=None, check_base: bool = True,
                          **kwargs) -> None:
        """diffusers' load_lora_weights, refusing adapters that train-ldm trained on another UNet than this
        pipeline's (`check_base=False` loads them anyway)."""
        source = local_source(pretrained_model_name_or_path_or_dict)
        kwargs = safetensors_only(source, kwargs)  # a pickle is refused first
        if check_base:
            check_adapter_base(self.unet, source, kwargs)
        try:
            super().load_lora_weights(source, adapter_name=adapter_name, **kwargs)
        except (OSError, ValueError) as error:  # a mistyped folder would read as a failed Hub lookup
            raise missing_source(source) or error

    def fuse_lora(self, *args, **kwargs) -> None:
        """diffusers' fuse_lora, keeping the adapted layers' own weights and scales so that `unfuse_lora` restores
        them exactly."""
        self._unfused = keep_unfused({"unet": self.unet, "text_encoder": self.text_encoder}, getattr(self, "_unfused", {}))
        super().fuse_lora(*args, **kwargs)

    def unfuse_lora(self, *args, **kwargs) -> None:
        """diffusers' unfuse_lora, leaving the weights bit for bit as before `fuse_lora` (peft alone leaves them off by
        rounding, and a LoRA trained on this base would then be refused by `load_lora_weights`), and the adapters at
        their scales from before (`fuse_lora(lora_scale=s)` alone leaves them scaled by s)."""
        models = {"unet": self.unet, "text_encoder": self.text_encoder}
        fused = {name for name, layer in adapted_layers(models).items() if layer.merged}
        super().unfuse_lora(*args, **kwargs)
        self._unfused = restore_unfused(models, getattr(self, "_unfused", {}), fused)

    @classmethod
    def lora_state_dict(cls, pretrained_model_name_or_path_or_dict, **kwargs):
        """diffusers' lora_state_dict (what `load_lora_weights` reads through), from safetensors files only."""
        return super().lora_state_dict(pretrained_model_name_or_path_or_dict,
                                       **safetensors_only(pretrained_model_name_or_path_or_dict, kwargs))

    def save_pretrained(self, save_directory: str | Path, **kwargs) -> None:
        """diffusers' save_pretrained, in safetensors only; `built_from` is then re-measured on the files just written."""
        check_savable(self, kwargs)
        # `~` expanded as from_pretrained expands it (diffusers would make a folder named '~' in the working
        # directory); a file or read-only path is named before any component is written
        save_directory = writable_folder(Path(save_directory).expanduser(), "save_directory")
        super().save_pretrained(str(save_directory), **kwargs)
        for component in save_directory.iterdir():
            remove_stale_shard_index(component)
        if self.config.built_from:
            self.register_to_config(built_from={name: folder_fingerprint(Path(save_directory) / name)
                                                for name in self.config.built_from})
            self.save_config(save_directory)

    # ---- writing a line of glyphs (one per character), for class datasets of characters ------------

    def segment(self, text: str) -> list[int | None]:
        """Class indices for the characters of `text` (None for a space); see `pipelines.glyphs.segment`."""
        return segment(self.classes, text)

    @torch.no_grad()
    def write(self, text: str, num_inference_steps: int | None = None, guidance_scale: float | None = None,
              generator: torch.Generator | None = None, gap: int | None = None,
              layout: LineLayout | None = None, guidance_interval: tuple[float, float] | None = None,
              negative_prompt: str | None = None) -> PIL.Image.Image:
        """`text` as one line of generated glyphs, one per character (or Devanagari cluster).

        Each glyph is cropped to its own ink and set on a baseline: small letters at x-height, g j p q y
        below the line, a word gap for each space (`pipelines.glyphs.lay_out_line`; `layout` changes the
        spacing and proportions, `gap` the pixels between letters). All glyphs come from one batched
        call, so one `generator` seed fixes the whole line (and `negative_prompt` is every glyph's). Raises
        ValueError naming every character the run has no class for.
        """
        glyphs = self.segment(text)
        prompts = [self.classes[k]["prompt"] for k in glyphs if k is not None]
        images = self(prompts, negative_prompt=negative_prompt, num_inference_steps=num_inference_steps,
                      guidance_scale=guidance_scale, generator=generator,
                      guidance_interval=guidance_interval).images if prompts else []
        symbols = [None if k is None else str(self.classes[k]["fields"].get("symbol", "")) for k in glyphs]
        layout = layout or LineLayout()
        if gap is not None:
            layout = dataclasses.replace(layout, gap=gap)
        return lay_out_line(symbols, images, self.unet.config.sample_size * self.vae_scale_factor, layout)

    # ---- the steps of __call__ -------------------------------------------------------------------

    def encode_prompt(self, prompt: str | list[str] | None, device: torch.device, num_images_per_prompt: int,
                      do_classifier_free_guidance: bool, negative_prompt: str | list[str] | None = None,
                      prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token states for the prompts and, with guidance, the negatives, as StableDiffusionPipeline.encode_prompt:
        (B * num_images_per_prompt, L, D) each; given `prompt_embeds` / `negative_prompt_embeds` (B, L, D) are used
        as they are (and repeated per image). The negatives default to the empty prompt."""
        if prompt_embeds is None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else negative_prompt
            if negative_prompt_embeds is None:
                return encode_prompts(self.tokenizer, self.text_encoder, prompts, device, num_images_per_prompt,
                                      do_classifier_free_guidance, negatives)
            prompt_embeds, _ = encode_prompts(self.tokenizer, self.text_encoder, prompts, device, 1, False)
        prompt_embeds = prompt_embeds.to(device)
        batch = len(prompt_embeds)
        if do_classifier_free_guidance and negative_prompt_embeds is None:
            negatives = [negative_prompt] * batch if isinstance(negative_prompt, str) or negative_prompt is None else negative_prompt
            negative_prompt_embeds, _ = encode_prompts(self.tokenizer, self.text_encoder, [n or "" for n in negatives],
                                                       device, 1, False)
        repeat = lambda embeds: embeds.to(device).repeat_interleave(num_images_per_prompt, dim=0)  # noqa: E731
        return repeat(prompt_embeds), repeat(negative_prompt_embeds) if do_classifier_free_guidance else None

    def prepare_latents(self, batch_size: int, height: int, width: int, dtype: torch.dtype, device: torch.device,
                        generator: torch.Generator | list[torch.Generator] | None,
                        latents: torch.Tensor | None = None) -> torch.Tensor:
        shape = (batch_size, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        return initial_latents(self.scheduler, shape, dtype, device, generator, latents)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """(N, C_lat, h, w) scaled latents -> (N, C, H, W) images in [-1, 1]."""
        return decode_latents(self.vae, latents)

    def predict_noise(self, latents: torch.Tensor, t: torch.Tensor, prompt_embeds: torch.Tensor,
                      negative_embeds: torch.Tensor | None, guidance_scale: float) -> torch.Tensor:
        """The guided model output: uncond + s * (cond - uncond), both halves in one UNet call."""
        return guided_prediction(self.unet, self.scheduler, latents, t, prompt_embeds, negative_embeds, guidance_scale)

    def check_inputs(self, prompts: list, negative_prompt: list[str] | None, num_inference_steps: int,
                     num_images_per_prompt: int, output_type: str, callback_tensor_inputs: list[str],
                     generator: Any, device: torch.device, guidance_scale: float = 1.0,
                     height: int | None = None, width: int | None = None, prompt_embeds: torch.Tensor | None = None,
                     negative_prompt_embeds: torch.Tensor | None = None,
                     guidance_interval: tuple[float, float] = NO_INTERVAL, **more: Any) -> None:
        """Refuse arguments that cannot work, saying what to pass instead (`pipelines.call_checks`; `more`:
        latents, eta, guidance_rescale, timesteps, sigmas)."""
        check_call_inputs(self, prompts, negative_prompt, num_inference_steps, num_images_per_prompt, output_type,
                          callback_tensor_inputs, generator, device, guidance_scale, height, width, prompt_embeds,
                          negative_prompt_embeds, guidance_interval, **more)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = "",
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[[Any, int, torch.Tensor, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        eta: float = 0.0,
        guidance_rescale: float = 0.0,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_interval: tuple[float, float] | None = None,
    ) -> LatentPipelineOutput | tuple:
        """Generate images for one prompt or a list of prompts.

        Args:
            prompt: text(s) to draw; "" gives unconditional samples.
            negative_prompt: what guidance steers away from (default: the empty prompt).
            num_images_per_prompt: images per prompt.
            num_inference_steps: scheduler steps (default: the run's, `self.config.sampling`).
            guidance_scale: classifier-free guidance weight; <= 1 disables guidance (conditional only)
                (default: the run's tuned value, `self.config.sampling`).
            generator: torch.Generator(s) for reproducible noise.
            latents: start from these (B * num_images_per_prompt, C, h, w) noise latents instead.
            height, width: image size in pixels (default: the training size).
            output_type: "pil", "np", "pt" (images in [0, 1]) or "latent".
            return_dict: return a LatentPipelineOutput rather than a tuple.
            callback_on_step_end: `fn(pipe, step_index, timestep, tensors) -> dict` after each step (the
                timestep as a 0-dim tensor on the host, where reading it waits for nothing);
                it may return replacements for the tensors named in `callback_on_step_end_tensor_inputs`
                (`latents`, `prompt_embeds`, `negative_prompt_embeds` are used from then on).
            prompt_embeds, negative_prompt_embeds: (B, L, D) text states to use instead of `prompt` /
                `negative_prompt` (see `encode_prompt`).
            eta: DDIM's eta (Song et al. 2021): 0 is deterministic; ignored by schedulers without it.
            guidance_rescale: rescales the guided output towards the conditional one's std (Lin et al.
                2024, section 3.4); 0 disables it.
            timesteps, sigmas: a custom schedule for schedulers whose `set_timesteps` accepts one.
            guidance_interval: (start, stop), the fraction of the steps that are guided, counted as
                diffusers' guiders do (0 is the noisiest step); the others use the conditional output
                alone (Kynkäänniemi et al. 2024). Default: the run's own, else every step.

        Returns:
            LatentPipelineOutput with `.images`, or a 1-tuple of the images.
        """
        prompts = [] if prompt is None or (prompt == "" and prompt_embeds is not None) else \
            [prompt] if isinstance(prompt, str) else list(prompt)
        num_inference_steps, guidance_scale = self.sampling_defaults(num_inference_steps, guidance_scale)
        guidance_interval = self.default_guidance_interval(guidance_interval)
        if isinstance(negative_prompt, str):
            negative_prompt = [negative_prompt] * (len(prompts) or (len(prompt_embeds) if prompt_embeds is not None else 0))
        device = self._execution_device
        self.check_inputs(prompts, negative_prompt, num_inference_steps, num_images_per_prompt, output_type,
                          list(callback_on_step_end_tensor_inputs), generator, device, guidance_scale, height, width,
                          prompt_embeds, negative_prompt_embeds, guidance_interval, latents=latents, eta=eta,
                          guidance_rescale=guidance_rescale, timesteps=timesteps, sigmas=sigmas)
        default_size = self.unet.config.sample_size * self.vae_scale_factor
        height, width = height or default_size, width or default_size
        guided = guidance_scale > 1.0

        prompt_embeds, negative_embeds = self.encode_prompt(prompts, device, num_images_per_prompt, guided,
                                                            negative_prompt, prompt_embeds, negative_prompt_embeds)
        # text states (and so the noise) in the UNet's dtype: the text encoder may hold another, e.g. a pipeline
        # saved in fp16 loads with transformers' text encoder in fp16 but diffusers' UNet in fp32
        prompt_embeds = prompt_embeds.to(self.unet.dtype)
        negative_embeds = negative_embeds.to(self.unet.dtype) if negative_embeds is not None else None
        retrieve_timesteps(self.scheduler, None if timesteps or sigmas else num_inference_steps, device, timesteps, sigmas)
        latents = self.prepare_latents(len(prompt_embeds), height, width, prompt_embeds.dtype, device, generator, latents)

        embeds = {"prompt_embeds": prompt_embeds, "negative_prompt_embeds": negative_embeds}  # as the callback leaves them

        def on_step(i: int, t: torch.Tensor, step: Any, before: torch.Tensor, noise_pred: torch.Tensor) -> dict:
            tensors = {"latents": step.prev_sample, **embeds, "noise_pred": noise_pred}
            if "pred_original_sample" in callback_on_step_end_tensor_inputs:
                tensors["pred_original_sample"] = predicted_clean_latents(self.scheduler, step, before, noise_pred, t)
            outputs = callback_on_step_end(self, i, t, {k: tensors[k] for k in callback_on_step_end_tensor_inputs}) or {}
            embeds.update({k: v for k, v in outputs.items() if k in embeds})
            return outputs

        latents = denoise(self.unet, self.scheduler, latents, prompt_embeds, negative_embeds, guidance_scale, generator,
                          on_step if callback_on_step_end is not None else None, self.progress_bar, eta, guidance_rescale,
                          guidance_interval)
        if output_type == "latent":
            images = latents
        else:
            decoded = self.decode_latents(latents)
            if not torch.isfinite(decoded).all():
                raise FloatingPointError("the VAE decoded non-finite pixels from finite latents; check vae/ "
                                         "(e.g. run the VAE in float32: pipe.vae.to(torch.float32))")
            images = self.image_processor.postprocess(decoded, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return LatentPipelineOutput(images=images)
