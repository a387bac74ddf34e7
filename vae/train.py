"""train-vae: stage one. Trains an AutoencoderKL on the dataset's images and writes `run/vae/`.

    train-vae --config configs/mnist.yaml [--set vae.max_steps=2000 ...]

Re-running the same command resumes from `run/train_state/vae/`. At the end the VAE (EMA weights
when `vae.ema_decay` > 0) is saved with `scaling_factor` = 1 / std of its latents on the training
set, and held-out PSNR/SSIM are printed and logged.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from contextlib import nullcontext

import torch

from common.checkpoint import atomic_directory, write_json
from common.cli import run_cli
from common.config import Config
from common.data import StepBatches, TrainingImages, augment_batch, load_train_and_holdout, spread_indices, steps_for
from common.loop import evaluating
from common.training import Trainer
from vae.model import (AutoencoderWithPosterior, PatchDiscriminator, autoencoder_loss, build_perceptual_loss, initial_vae,
                       discriminator_loss)
from vae.reconstruct import latent_std, reconstruction_grid, reconstruction_metrics


@contextlib.contextmanager
def frozen(params: list[torch.nn.Parameter]):
    """Use a module's parameters without accumulating gradients into them (the discriminator's in the VAE's step).
    The list is made once, before the loop: walking the module at every step costs the host time a GPU waits for."""
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def main(config: Config, args: argparse.Namespace | None = None) -> dict:
    cfg = config.vae
    with Trainer("vae", config, cfg) as trainer:
        run, device = trainer.run, trainer.device

        train_set, holdout_set = load_train_and_holdout(config.data)
        trainer.record_inputs(dataset=train_set.fingerprint())
        trainer.print(f"[vae] {len(train_set)} training images, {len(holdout_set)} held out, "
                      f"{config.data.image_size}x{config.data.image_size}x{config.data.channels}")

        vae, origin = initial_vae(config)  # vae.init_from: fine-tune a trained VAE
        trainer.print(f"[vae] {origin}")
        autoencoder = trainer.add("vae", AutoencoderWithPosterior(vae), ema=True)
        last_layer = trainer.unwrap("vae").vae.decoder.conv_out.weight  # where the GAN weight is balanced
        use_gan = cfg.disc_start >= 0 and cfg.disc_weight > 0
        disc = trainer.add("disc", PatchDiscriminator(config.data.channels, cfg.disc_channels, cfg.disc_layers)) if use_gan else None
        judge = trainer.unwrap("disc") if use_gan else None  # the discriminator as the VAE's loss reads it: no DDP
        judge_params = list(judge.parameters()) if use_gan else []
        perceptual = build_perceptual_loss(cfg)
        if perceptual is not None:
            perceptual.to(device)
        trainer.describe_batch()

        total_steps = steps_for(cfg.max_steps, cfg.epochs, len(train_set), trainer.global_batch)
        start = trainer.resume()
        sampler = StepBatches(len(train_set), cfg.batch_size, config.seed, start, trainer.rank, trainer.world_size,
                              cfg.grad_accum)
        training_images = TrainingImages(train_set, sampler, device, config.data.num_workers)
        trainer.print(f"[vae] training images {training_images.describe()}")
        grid_images = torch.stack([holdout_set[i]["pixel_values"] for i in spread_indices(len(holdout_set), 32)]).to(device)

        # the adaptive GAN weight backpropagates through the VAE three times (retain_graph), which a compiled
        # model's donated buffers forbid; they are chosen when it compiles, at the first step, GAN on or not
        whole_graph = torch._functorch.config.patch(donated_buffer=False) if use_gan and trainer.setup["compiled"] else nullcontext()
        with trainer.running(total_steps), whole_graph:
            for step in range(start, total_steps):
                trainer.set_learning_rate(step)
                trainer.reseed(step)
                gan_on = use_gan and step >= cfg.disc_start
                for micro in range(cfg.grad_accum):
                    images, _ = training_images.batch(step, micro)  # (B, C, H, W) in [-1, 1]
                    if cfg.augment:
                        images = augment_batch(images, config.data.augment)
                    with trainer.no_sync("vae", micro), frozen(judge_params) if gan_on else nullcontext():
                        loss, terms, recon = autoencoder_loss(autoencoder, images, cfg, perceptual, judge if gan_on else None,
                                                              last_layer)
                        trainer.backward(loss / cfg.grad_accum)
                    if gan_on:
                        with trainer.no_sync("disc", micro):
                            disc_loss = discriminator_loss(disc, images, recon)
                            trainer.backward(disc_loss / cfg.grad_accum)
                        terms["disc"] = disc_loss.detach()
                finite = trainer.optimizer_step("vae")
                if gan_on:
                    finite = finite & trainer.optimizer_step("disc")
                trainer.check_finite(finite, step)
                trainer.update_ema(step)
                trainer.log(step, **terms)
                if trainer.is_main and (step + 1) % cfg.sample_every == 0:
                    with evaluating(trainer.inference_model("vae")) as model:
                        trainer.log_image(run.samples / f"vae-step{step + 1:06d}.png",
                                          reconstruction_grid(model.vae, grid_images), step + 1)
                trainer.save_if_due(step)
        trainer.save_final()

        results = {}
        if trainer.is_main:
            results = export(trainer, config, train_set, holdout_set, grid_images)
        trainer.accelerator.wait_for_everyone()
        return results


def export(trainer: Trainer, config: Config, train_set, holdout_set, grid_images: torch.Tensor) -> dict:
    """Measure the latent scale (kept from vae.init_from when no step was trained), save `run/vae/`, report held-out PSNR/SSIM and a reconstruction grid."""
    run, cfg = trainer.run, config.vae
    vae = trainer.inference_model("vae").vae.eval()
    if cfg.init_from and trainer.step == 0:  # an untouched VAE (vae.max_steps=0) keeps the scale its UNet knows
        scaling_factor = vae.config.scaling_factor
    else:
        scaling_factor = 1.0 / latent_std(vae, train_set, cfg.scale_images)
    vae.register_to_config(scaling_factor=scaling_factor)
    with atomic_directory(run.component("vae")) as folder:
        vae.save_pretrained(folder, safe_serialization=True)
        run.stamp(folder, "vae", trainer.step)
    metrics = reconstruction_metrics(vae, holdout_set, cfg.eval_images)
    grid_path = trainer.log_image(run.samples / "vae-reconstructions.png", reconstruction_grid(vae, grid_images), trainer.step)
    results = {"step": trainer.step, "heldout_psnr": metrics["psnr"], "heldout_ssim": metrics["ssim"],
               "heldout_images": metrics["images"], "scaling_factor": scaling_factor, "grid": str(grid_path)}
    trainer.write_log({"event": "final", **results})
    write_json(run.root / "vae_metrics.json", results)
    trainer.print(f"[vae] held-out PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.4f} "
                  f"({metrics['images']} images); scaling_factor {scaling_factor:.4f}")
    trainer.print(f"[vae] saved {run.component('vae')}; reconstructions in {grid_path}")
    return results


def cli(argv: list[str] | None = None) -> None:
    run_cli(__doc__, main, argv)


if __name__ == "__main__":
    cli()
