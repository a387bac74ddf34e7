"""train-ldm: stage two. Trains a text-conditioned UNet on the cached latents and completes the run folder.

    train-ldm --config configs/mnist.yaml

Reads `run/latents/` (refusing a cache made with another VAE or dataset), the frozen CLIP text
encoder, and trains diffusers' UNet2DConditionModel to denoise latents (Rombach et al. 2022) with
classifier-free guidance dropout (Ho & Salimans 2022). Each step draws a fresh latent from each
image's cached posterior (mean + std * noise), scaled by the VAE's `scaling_factor`. Text states
are computed once per distinct caption. Writes `run/unet/` (EMA weights), `run/scheduler/`
(DPM-Solver++) and `run/model_index.json` (with the class table); sample grids go to `run/samples/`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from common.checkpoint import atomic_directory, folder_fingerprint
from common.cli import run_cli
from common.config import Config, LDMConfig
from common.devices import fits_on
from common.errors import UserError
from common.run import RunFolder
from common.data import ImageDataset, StepBatches, steps_for
from common.images import prompt_grid
from common.loop import evaluating
from common.training import Trainer
from ldm.latents import LatentCache, load_cache, vae_fingerprint
from ldm.lora import LORA_FILE, add_lora, merged, save_lora
from ldm.model import build_noise_scheduler, diffusion_loss, inference_scheduler, initial_unet
from ldm.sampling import sample_images
from ldm.text import (caption_variants, check_classes_read_apart, check_prompts_apart, encode_text, load_text_encoder,
                      text_encoder_fingerprint, text_encoder_source)
from vae.model import load_vae


def main(config: Config, args: argparse.Namespace | None = None) -> dict:
    cfg = config.ldm
    with Trainer("ldm", config, cfg) as trainer:
        run, device = trainer.run, trainer.device
        check_whole_unet_compiled(trainer)

        # Inputs: the latent cache (checked against the VAE and dataset it was made from) and the text encoder
        run.check_finished("vae", "vae")
        if not config.text_encoder.pretrained:
            run.check_finished("clip", "text_encoder")
            run.check_finished("clip", "tokenizer")
        vae = load_vae(run.component("vae")).to(device)  # decodes the preview grids; never encodes here
        listing_only = ImageDataset(config.data, "all")  # file names and captions only: stage two reads no pixels
        cache = load_cache(run.latents, vae_fingerprint(run.component("vae")), listing_only.fingerprint())
        train_latents = cache.split(holdout=False)
        if fits_on(device, train_latents.nbytes):  # resident: a step gathers its rows on the device, no disk, no copy
            train_latents = train_latents.to_device(device)
        tokenizer, text_encoder = load_text_encoder(config)
        text_encoder.to(device)
        check_classes_read_apart(tokenizer, [c.key for c in listing_only.classes], listing_only.class_prompts(),
                                 "" if config.text_encoder.pretrained else "clip.max_length and re-run train-clip")
        check_prompts_apart(tokenizer, text_encoder, listing_only.class_prompts(), f"({text_encoder_source(config)[0]})")
        trainer.record_inputs(latent_cache=cache.manifest["key"], text_encoder=text_encoder_fingerprint(config))
        # text states of every caption and its perturbed variants, computed once: (K + 1, V + 1, L, D)
        variants = caption_variants(tokenizer, cache.captions + [""], cfg.caption_variants, config.seed)
        variants[-1] = [""] * (cfg.caption_variants + 1)  # the empty prompt stays empty
        caption_states = encode_text(tokenizer, text_encoder, [v for group in variants for v in group])
        caption_states = caption_states.view(len(variants), cfg.caption_variants + 1, *caption_states.shape[1:])
        empty_caption = len(cache.captions)
        latent_channels, latent_size = train_latents.latent_shape[0], train_latents.latent_shape[-1]
        trainer.print(f"[ldm] {len(train_latents)} training latents of {latent_channels}x{latent_size}x{latent_size}, "
                      f"{len(cache.captions)} distinct captions x {cfg.caption_variants + 1} variants, "
                      f"text states {tuple(caption_states.shape[2:])}; latents "
                      f"{'on ' + str(device) if train_latents.resident else 'memory-mapped from ' + str(run.latents)} "
                      f"({train_latents.nbytes / 2**20:.1f} MB)")

        unet, origin = initial_unet(cfg, latent_channels, latent_size, text_encoder.config.hidden_size)  # ldm.init_from
        if cfg.lora_rank:  # adapters on the attention only; the base's weights stay frozen
            check_lora_base(config)
            unet = add_lora(unet, cfg.lora_rank, cfg.lora_alpha)
        unet = trainer.add("unet", unet, ema=True)
        trainable = sum(p.numel() for p in unet.parameters() if p.requires_grad)
        trainer.print(f"[ldm] UNet: {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M parameters, "
                      f"{trainable / 1e6:.3f}M trained{f' (LoRA rank {cfg.lora_rank})' if cfg.lora_rank else ''}; {origin}")
        trainer.describe_batch()
        noise_scheduler = build_noise_scheduler(cfg)
        scaling_factor = vae.config.scaling_factor
        class_prompts = listing_only.class_prompts()
        validation_prompts = cfg.validation_prompts or class_prompts or cache.captions[:8]

        total_steps = steps_for(cfg.max_steps, cfg.epochs, len(train_latents), trainer.global_batch)
        start = trainer.resume()
        sampler = StepBatches(len(train_latents), cfg.batch_size, config.seed, start, trainer.rank,
                              trainer.world_size, cfg.grad_accum)

        with trainer.running(total_steps):
            for step in range(start, total_steps):
                trainer.set_learning_rate(step)
                trainer.reseed(step)
                for micro in range(cfg.grad_accum):
                    rows = sampler.index_tensor(step, micro, train_latents.labels.device)
                    latents, text_states = training_batch(train_latents, rows, caption_states, cfg, scaling_factor,
                                                          empty_caption, device)
                    with trainer.no_sync("unet", micro):
                        loss = diffusion_loss(unet, noise_scheduler, latents, text_states, cfg)
                        trainer.backward(loss / cfg.grad_accum)
                trainer.check_finite(trainer.optimizer_step("unet"), step)
                trainer.update_ema(step)
                trainer.log(step, loss=loss.detach())
                if trainer.is_main and ((step + 1) % cfg.sample_every == 0 or step + 1 == total_steps):
                    path = run.samples / f"ldm-step{step + 1:06d}.png"
                    with evaluating(trainer.inference_model("unet")) as ema_unet:
                        trainer.log_image(path, sample_sheet(vae, tokenizer, text_encoder, ema_unet, noise_scheduler,
                                                             validation_prompts, config), step + 1)
                    trainer.print(f"\n[ldm] samples at step {step + 1}: {path}")
                trainer.save_if_due(step)
        trainer.save_final()

        if trainer.is_main:
            classes = [{**c, "prompt": p} for c, p in zip(cache.manifest["classes"], class_prompts)]
            export(trainer, config, tokenizer, text_encoder, noise_scheduler, classes)
        trainer.accelerator.wait_for_everyone()
        return {"step": trainer.step}


def training_batch(cache: LatentCache, rows: torch.Tensor, caption_states: torch.Tensor, cfg: LDMConfig,
                   scaling_factor: float, empty_caption: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents and text states for the images `rows` of the cache: (B, C, h, w), (B, L, D).

    A fresh sample from each image's cached posterior, scaled to unit variance; one of its captions
    (in one of its perturbed variants), replaced by the empty prompt with probability cond_dropout.
    """
    mean, std = (t.to(device, non_blocking=True) for t in cache.latents(rows))
    latents = (mean + std * torch.randn_like(mean)) * scaling_factor
    rows = rows.to(cache.captions_per_image.device)
    draw = torch.rand(len(rows), device=rows.device)
    chosen = cache.captions_per_image[rows, (draw * cache.num_captions[rows]).long()]
    dropped = torch.rand(len(rows), device=rows.device) < cfg.cond_dropout  # for classifier-free guidance
    chosen = torch.where(dropped, empty_caption, chosen)
    variant = torch.randint(caption_states.shape[1], (len(rows),), device=rows.device)
    return latents, caption_states[chosen.to(device), variant.to(device)]


def check_whole_unet_compiled(trainer: Trainer) -> None:
    """accelerate's regional compilation (`accelerate launch --dynamo_use_regional_compilation`, or accelerate
    config; it reaches an explicit ldm.compile too, through the environment) compiles the UNet's layers one by
    one, and diffusers' UNet then stops at its first step: it tests `if self.conv_norm_out:`, which a compiled
    layer answers with TypeError ("GroupNorm does not support len()")."""
    plugin = trainer.accelerator.state.dynamo_plugin
    if trainer.setup["compiled"] and getattr(plugin, "use_regional_compilation", False):
        raise UserError("train-ldm: accelerate's regional compilation (--dynamo_use_regional_compilation, or accelerate "
                        "config) compiles the UNet's layers one by one, which diffusers' UNet cannot run (its "
                        "`if self.conv_norm_out:` fails on a compiled layer); compile the whole UNet: launch without "
                        "regional compilation")


def check_lora_base(config: Config) -> None:
    """LoRA adapters are loaded into the base's pipeline, which decodes with the base's VAE and reads
    prompts with its text encoder: this run must use the very same ones, or the adapters learn for
    latents and text states that pipeline never makes."""
    base = Path(config.ldm.init_from).expanduser()
    if not (base / "unet").is_dir() and (base.parent / "model_index.json").is_file():
        base = base.parent  # init_from names a run's unet/ itself: the base's vae/ and text_encoder/ are beside it
    ours = {"vae": RunFolder(config.run_dir).component("vae"), "text_encoder": Path(text_encoder_source(config)[0])}
    for component, how in (("vae", f"vae.init_from={base} with vae.max_steps=0"),
                           ("text_encoder", f"text_encoder.pretrained={base} instead of train-clip")):
        if (base / component).is_dir() and folder_fingerprint(base / component) != folder_fingerprint(ours[component]):
            raise UserError(f"ldm.lora_rank: this run's {component} ({ours[component]}) differs from the base's "
                            f"({base / component}), so the adapters would not fit the base pipeline they load into. "
                            f"Use the base's {component} unchanged ({how}), or fine-tune fully (ldm.lora_rank=0)")


def sample_sheet(vae, tokenizer, text_encoder, unet, noise_scheduler, prompts: list[str], config: Config,
                 per_prompt: int = 8):
    """A labelled row of `per_prompt` samples for each prompt, from a fixed seed, with the inference sampler."""
    generator = torch.Generator(unet.device).manual_seed(config.seed)
    images = sample_images(vae, tokenizer, text_encoder, unet, inference_scheduler(noise_scheduler), prompts,
                           per_prompt, config.sample.num_inference_steps, config.sample.guidance_scale, generator)
    return prompt_grid(images, prompts, per_prompt)


def export(trainer: Trainer, config: Config, tokenizer, text_encoder, noise_scheduler, classes: list[dict]) -> None:
    """Write the inference half of the run folder: unet (EMA), scheduler, text encoder copies, model_index."""
    run = trainer.run
    unet = trainer.inference_model("unet")
    if config.ldm.lora_rank:  # the adapters alone for the base's pipeline, and the merged UNet for this run's
        trainer.print(f"[ldm] LoRA weights: {save_lora(unet, run.root)} (pipe.load_lora_weights('{run.root}') "
                      f"on the base {config.ldm.init_from})")
        unet = merged(unet)
    elif (run.root / LORA_FILE).exists():  # adapters from an earlier LoRA training of this run: not for this UNet
        (run.root / LORA_FILE).unlink()
        trainer.print(f"[ldm] removed {run.root / LORA_FILE}: this run's UNet is now fully trained (ldm.lora_rank=0)")
    with atomic_directory(run.component("unet")) as folder:
        unet.save_pretrained(folder, safe_serialization=True)
        run.stamp(folder, "ldm", trainer.step)
    scheduler = inference_scheduler(noise_scheduler)
    with atomic_directory(run.component("scheduler")) as folder:
        scheduler.save_pretrained(folder)
    if config.text_encoder.pretrained:  # copy a pretrained CLIP in, so the run folder is self-contained
        with atomic_directory(run.component("text_encoder")) as folder:
            text_encoder.save_pretrained(folder, safe_serialization=True)
        with atomic_directory(run.component("tokenizer")) as folder:
            tokenizer.save_pretrained(folder)
    components = {"vae": ("diffusers", "AutoencoderKL"), "unet": ("diffusers", type(unet).__name__),
                  "scheduler": ("diffusers", type(scheduler).__name__),
                  "text_encoder": ("transformers", type(text_encoder).__name__),
                  "tokenizer": ("transformers", type(tokenizer).__name__)}
    # what the UNet was trained on: the pipeline refuses a run whose vae/, text_encoder/ or tokenizer/ changed since;
    # and the UNet itself, written before this index: a process killed in between leaves a new unet/ beside the old
    # index and scheduler, which would load without a word
    built_from = {name: folder_fingerprint(run.component(name)) for name in ("vae", "text_encoder", "tokenizer", "unet")}
    # the run's sampling defaults, used by pipe(prompt), write(), generate and evaluate when not given
    sampling = {"num_inference_steps": config.sample.num_inference_steps, "guidance_scale": config.sample.guidance_scale,
                "guidance_interval": list(config.sample.guidance_interval)}
    run.write_model_index(components, {"classes": classes, "built_from": built_from, "sampling": sampling})
    trainer.print(f"[ldm] saved {run.component('unet')}, {run.component('scheduler')} and {run.root / 'model_index.json'}; "
                  f"load it with LatentPipeline.from_pretrained('{run.root}')")


def cli(argv: list[str] | None = None) -> None:
    run_cli(__doc__, main, argv)


if __name__ == "__main__":
    cli()
