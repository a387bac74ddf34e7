"""train-ldm: stage two. Trains a text-conditioned UNet on the cached latents and completes the run folder.

    train-ldm --config configs/mnist.yaml

Reads `run/latents/` (refusing a cache made with another VAE or dataset), the frozen CLIP text
encoder, and trains diffusers' UNet2DConditionModel to denoise latents (Rombach et al. 2022) with
classifier-free guidance dropout (Ho & Salimans 2022). Each step draws a fresh latent from each
image's cached posterior (mean + std * noise), scaled by the VAE's `scaling_factor`. Text states
are computed once per distinct caption. Writes `run/unet/` (EMA weights), `run/scheduler/`
(DPM-Solver++) and `run/model_index.json`; sample grids go to `run/samples/`.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.training_utils import compute_snr

from common.checkpoint import atomic_directory, write_text
from common.config import Config, dump_config, run_cli
from common.data import ImageDataset, StepBatches, steps_for
from common.errors import UserError
from common.images import prompt_grid, save_image
from common.training import Trainer, evaluating
from ldm.latents import load_cache, vae_fingerprint
from ldm.model import build_noise_scheduler, build_unet, inference_scheduler
from ldm.text import encode_text, load_text_encoder
from pipelines.latent_pipeline import LatentPipeline


def main(config: Config, args: argparse.Namespace | None = None) -> dict:
    cfg = config.ldm
    trainer = Trainer("ldm", config, cfg)
    run, device = trainer.run, trainer.device
    trainer.print(dump_config(config))
    if trainer.is_main:
        run.save_config(config)

    # Inputs: the latent cache (checked against the VAE and dataset it was made from) and the text encoder
    vae_folder = run.component("vae")
    if not (vae_folder / "config.json").is_file():
        raise UserError(f"no trained VAE in {vae_folder}; run `train-vae` and `encode-dataset` first")
    vae_config = AutoencoderKL.load_config(vae_folder)
    listing_only = ImageDataset(config.data, "all")  # file names and captions only: stage two reads no pixels
    cache = load_cache(run.latents, vae_fingerprint(vae_folder), listing_only.fingerprint())
    train_latents = cache.split(holdout=False)
    tokenizer, text_encoder = load_text_encoder(config)
    text_encoder.to(device)
    caption_states = encode_text(tokenizer, text_encoder, cache.captions + [""])  # (K + 1, L, D), once
    empty_caption = len(cache.captions)
    latent_channels, latent_size = train_latents.mean.shape[1], train_latents.mean.shape[-1]
    trainer.print(f"[ldm] {len(train_latents)} training latents of {latent_channels}x{latent_size}x{latent_size}, "
                  f"{len(cache.captions)} distinct captions, text states {tuple(caption_states.shape[1:])}")

    unet = trainer.add("unet", build_unet(cfg, latent_channels, latent_size, text_encoder.config.hidden_size), ema=True)
    trainer.print(f"[ldm] UNet: {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M parameters")
    trainer.describe_batch()
    noise_scheduler = build_noise_scheduler(cfg)
    scaling_factor = vae_config["scaling_factor"]
    validation_prompts = cfg.validation_prompts or listing_only.class_prompts() or cache.captions[:8]

    total_steps = steps_for(cfg.max_steps, cfg.epochs, len(train_latents), trainer.global_batch)
    start = trainer.resume()
    sampler = StepBatches(len(train_latents), cfg.batch_size, config.seed, start, trainer.rank,
                          trainer.world_size, cfg.grad_accum)
    captions_per_image, num_captions = train_latents.captions_per_image, train_latents.num_captions

    for step in trainer.steps(total_steps):
        for micro in range(cfg.grad_accum):
            rows = torch.tensor(sampler.indices(step, micro))
            mean, std = train_latents.mean[rows].to(device), train_latents.std[rows].to(device)
            latents = (mean + std * torch.randn_like(mean)) * scaling_factor  # (B, C, h, w), unit variance
            chosen = captions_per_image[rows, (torch.rand(len(rows)) * num_captions[rows]).long()]
            chosen[torch.rand(len(rows)) < cfg.cond_dropout] = empty_caption  # for classifier-free guidance
            text_states = caption_states[chosen.to(device)]  # (B, L, D)
            noise = torch.randn_like(latents)
            if cfg.offset_noise > 0:
                noise = noise + cfg.offset_noise * torch.randn(*latents.shape[:2], 1, 1, device=device)
            timesteps = torch.randint(0, cfg.num_train_timesteps, (len(rows),), device=device)
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            target = noise if cfg.prediction_type == "epsilon" else noise_scheduler.get_velocity(latents, noise, timesteps)
            with trainer.no_sync("unet", micro):
                prediction = unet(noisy, timesteps, encoder_hidden_states=text_states).sample
                loss = F.mse_loss(prediction.float(), target.float(), reduction="none").mean((1, 2, 3))  # (B,)
                loss = (loss * min_snr_weights(noise_scheduler, timesteps, cfg.snr_gamma, cfg.prediction_type)).mean()
                trainer.backward(loss / cfg.grad_accum)
        trainer.optimizer_step("unet")
        trainer.log(loss=loss.detach())
        if trainer.is_main and ((step + 1) % cfg.sample_every == 0 or step + 1 == total_steps):
            pipe = make_pipeline(run, tokenizer, text_encoder, trainer.inference_model("unet"), noise_scheduler)
            path = run.samples / f"ldm-step{step + 1:06d}.png"
            with evaluating(pipe.unet):
                save_image(sample_sheet(pipe, validation_prompts, config), path)
            trainer.print(f"\n[ldm] samples at step {step + 1}: {path}")

    if trainer.is_main:
        export(trainer, config, tokenizer, text_encoder, noise_scheduler)
    trainer.accelerator.wait_for_everyone()
    return {"step": trainer.step}


def min_snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023): min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for v."""
    if gamma <= 0:
        return torch.ones_like(timesteps, dtype=torch.float32)
    snr = compute_snr(noise_scheduler, timesteps)
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr


def make_pipeline(run, tokenizer, text_encoder, unet, noise_scheduler) -> LatentPipeline:
    vae = AutoencoderKL.from_pretrained(run.component("vae"), use_safetensors=True).to(unet.device).eval()
    return LatentPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                          scheduler=inference_scheduler(noise_scheduler))


def sample_sheet(pipe: LatentPipeline, prompts: list[str], config: Config, per_prompt: int = 8):
    """A row of `per_prompt` samples for each prompt, labelled, from a fixed seed."""
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator(pipe.device).manual_seed(config.seed)
    images = pipe(prompts, num_images_per_prompt=per_prompt, num_inference_steps=config.sample.num_inference_steps,
                  guidance_scale=config.sample.guidance_scale, generator=generator).images
    return prompt_grid(images, prompts, per_prompt)


def export(trainer: Trainer, config: Config, tokenizer, text_encoder, noise_scheduler) -> None:
    """Write the inference half of the run folder: unet (EMA), scheduler, text encoder copies, model_index."""
    run = trainer.run
    unet = trainer.inference_model("unet")
    with atomic_directory(run.component("unet")) as folder:
        unet.save_pretrained(folder, safe_serialization=True)
    scheduler = inference_scheduler(noise_scheduler)
    with atomic_directory(run.component("scheduler")) as folder:
        scheduler.save_pretrained(folder)
    if config.text_encoder.pretrained:  # copy a pretrained CLIP in, so the run folder is self-contained
        with atomic_directory(run.component("text_encoder")) as folder:
            text_encoder.save_pretrained(folder, safe_serialization=True)
        with atomic_directory(run.component("tokenizer")) as folder:
            tokenizer.save_pretrained(folder)
    pipe = make_pipeline(run, tokenizer, text_encoder, unet, noise_scheduler)
    write_text(run.root / "model_index.json", pipe.to_json_string())
    trainer.print(f"[ldm] saved {run.component('unet')}, {run.component('scheduler')} and {run.root / 'model_index.json'}; "
                  f"load it with LatentPipeline.from_pretrained('{run.root}')")


def cli(argv: list[str] | None = None) -> None:
    run_cli(__doc__.splitlines()[0], main, argv)


if __name__ == "__main__":
    cli()
