"""What a trained VAE is measured by: held-out reconstructions, PSNR/SSIM, and the latent scale."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL
from PIL import Image

from common.data import ImageDataset, image_batches, spread_indices, to_uint8
from common.images import make_grid, to_pil
from common.metrics import psnr, ssim


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """Encode to the posterior mean and decode: the deterministic reconstruction. (N, C, H, W) -> same."""
    return vae.decode(vae.encode(images).latent_dist.mode()).sample


@torch.no_grad()
def reconstruction_metrics(vae: AutoencoderKL, dataset: ImageDataset, limit: int, batch_size: int = 128) -> dict:
    """Mean per-image PSNR (dB) and SSIM over `limit` images spread evenly over `dataset` (every class
    of a class-ordered dataset, not the first few)."""
    device = next(vae.parameters()).device
    psnrs, ssims = [], []  # on the device, read once at the end (a read per batch would wait for a GPU each time)
    for batch in image_batches(dataset, batch_size, indices=spread_indices(len(dataset), limit), device=device):
        images = batch["pixel_values"]
        recon = reconstruct(vae, images)
        psnrs.append(psnr(recon, images))
        ssims.append(ssim(recon, images))
    return {"psnr": torch.cat(psnrs).mean().item(), "ssim": torch.cat(ssims).mean().item(),
            "images": sum(len(p) for p in psnrs)}


def scale_sample(length: int, limit: int, seed: int = 0) -> list[int]:
    """`limit` training images drawn at random (seeded), in ascending order: every class of a
    class-ordered dataset, not the first ones (the first 2,048 MNIST digits are zeros to fours)."""
    chosen = torch.randperm(length, generator=torch.Generator().manual_seed(seed))[:limit]
    return chosen.sort().values.tolist()


@torch.no_grad()
def latent_std(vae: AutoencoderKL, dataset: ImageDataset, limit: int, batch_size: int = 128) -> float:
    """Std of posterior samples over `limit` random training images: the LDM trains on latents / std.

    As in Stable Diffusion, scaling_factor = 1 / std gives the diffusion model unit-variance inputs
    (Rombach et al. 2022, section 4.3.2); here it is measured, not hard-coded.
    """
    device = next(vae.parameters()).device
    generator = torch.Generator(device=device).manual_seed(0)
    total, total_sq, count = 0.0, 0.0, 0  # float64 sums on the device, read once at the end
    for batch in image_batches(dataset, batch_size, indices=scale_sample(len(dataset), limit), device=device):
        latents = vae.encode(batch["pixel_values"]).latent_dist.sample(generator=generator).double()
        total, total_sq, count = total + latents.sum(), total_sq + latents.pow(2).sum(), count + latents.numel()
    mean = float(total) / count
    return (float(total_sq) / count - mean**2) ** 0.5


@torch.no_grad()
def reconstruction_grid(vae: AutoencoderKL, images: torch.Tensor, columns: int = 16) -> Image.Image:
    """Originals on the odd rows, their reconstructions on the row below."""
    recon = reconstruct(vae, images)
    tiles = []
    for start in range(0, len(images), columns):
        tiles += [to_pil(a) for a in to_uint8(images[start:start + columns])]
        tiles += [to_pil(a) for a in to_uint8(recon[start:start + columns])]
    return make_grid(tiles, columns, scale=2)
