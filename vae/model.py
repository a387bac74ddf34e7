"""Stage one's models and losses: diffusers' AutoencoderKL, a PatchGAN discriminator, LPIPS.

The loss is latent diffusion's autoencoder loss (Rombach et al. 2022, appendix G; Esser et al. 2021):
L1 reconstruction + LPIPS + a small KL + a PatchGAN hinge loss whose weight adapts to the ratio of
the reconstruction and adversarial gradients at the decoder's last layer, switched on at `disc_start`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import AutoencoderKL

from common.checkpoint import check_weights
from common.config import Config, VAEConfig
from common.errors import RunFolderError, UserError
from common.pretrained import adopt_architecture, load_diffusers_model
from common.run import WRITTEN_BY


def build_vae(config: VAEConfig, channels: int, image_size: int) -> AutoencoderKL:
    """Residual down/up blocks, attention in the middle block; image_size / 2**(levels-1) latents."""
    levels = len(config.block_out_channels)
    return AutoencoderKL(
        in_channels=channels,
        out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(config.block_out_channels),
        layers_per_block=config.layers_per_block,
        latent_channels=config.latent_channels,
        norm_num_groups=config.norm_num_groups,
        sample_size=image_size,
        mid_block_add_attention=config.mid_attention,
        scaling_factor=1.0,  # measured from the data at the end of training
    )


def initial_vae(config: Config) -> tuple[AutoencoderKL, str]:
    """The VAE a run starts from: `vae.init_from`'s (fine-tuning; its architecture replaces the config's)
    or a new one. Returns it and a line for the log."""
    cfg, data = config.vae, config.data
    if not cfg.init_from:
        return build_vae(cfg, data.channels, data.image_size), "new weights"
    vae, folder = load_diffusers_model(AutoencoderKL, cfg.init_from, "vae", "vae.init_from")
    c = vae.config
    if c.in_channels != data.channels or c.out_channels != data.channels:
        raise UserError(f"vae.init_from: the VAE in {folder} takes {c.in_channels}-channel images, but data.channels is "
                        f"{data.channels}; set data.channels={c.in_channels} or start from another VAE")
    factor = 2 ** (len(c.block_out_channels) - 1)
    if data.image_size % factor:
        raise UserError(f"vae.init_from: the VAE in {folder} downsamples by {factor}, which does not divide data.image_size "
                        f"({data.image_size}); use an image size that is a multiple of {factor}")
    if any(t != "DownEncoderBlock2D" for t in c.down_block_types):
        raise UserError(f"vae.init_from: the VAE in {folder} has blocks {c.down_block_types}; this toolkit trains "
                        f"AutoencoderKL with DownEncoderBlock2D/UpDecoderBlock2D blocks only")
    note = adopt_architecture(cfg, {"block_out_channels": list(c.block_out_channels), "layers_per_block": c.layers_per_block,
                                    "latent_channels": c.latent_channels, "norm_num_groups": c.norm_num_groups,
                                    "mid_attention": c.mid_block_add_attention}, "vae")
    vae.register_to_config(sample_size=data.image_size)
    return vae, f"weights from {folder} ({note})"


def load_vae(folder: Path) -> AutoencoderKL:
    """A trained VAE (`run/vae/`), frozen, in eval mode; safetensors only."""
    if not (Path(folder) / "config.json").is_file():
        raise RunFolderError(f"no trained VAE in {folder}; run `train-vae --config ...` first")
    check_weights(folder, WRITTEN_BY["vae"])
    return AutoencoderKL.from_pretrained(folder, use_safetensors=True).eval().requires_grad_(False)


class PatchDiscriminator(nn.Module):
    """The pix2pix PatchGAN (Isola et al. 2017): one real/fake logit per overlapping patch."""

    def __init__(self, channels: int, width: int = 64, layers: int = 3):
        super().__init__()
        blocks = [nn.Conv2d(channels, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        multiplier = 1
        for n in range(1, layers + 1):
            previous, multiplier = multiplier, min(2**n, 8)
            stride = 2 if n < layers else 1
            blocks += [nn.Conv2d(width * previous, width * multiplier, 4, stride=stride, padding=1, bias=False),
                       nn.BatchNorm2d(width * multiplier), nn.LeakyReLU(0.2, True)]
        blocks += [nn.Conv2d(width * multiplier, 1, 4, stride=1, padding=1)]
        self.net = nn.Sequential(*blocks)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) -> (N, 1, h, w)
        return self.net(images)


def discriminator_loss(disc: nn.Module, images: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """The PatchGAN's hinge loss on real `images` and their reconstructions `recon` (N, C, H, W), the two in one
    forward pass: DDP allows one forward per backward."""
    logits_real, logits_fake = disc(torch.cat([images, recon.detach()])).chunk(2)
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_gan_weight(rec_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """||grad rec|| / ||grad gan|| at the decoder's last layer (Esser et al. 2021, eq. 7). Each norm is taken
    before the next backward: under CUDA graphs (compile=reduce-overhead) a replay reuses its outputs' memory."""
    rec_norm = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0].norm()
    gan_norm = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0].norm()
    return (rec_norm / (gan_norm + 1e-4)).clamp(0.0, 1e4).detach()


def lpips_backbone_available(net: str) -> bool:
    """LPIPS needs torchvision's ImageNet backbone, which these machines cannot download."""
    import torchvision.models as tvm

    weights = {"vgg": tvm.VGG16_Weights, "alex": tvm.AlexNet_Weights, "squeeze": tvm.SqueezeNet1_1_Weights}[net]
    filename = os.path.basename(weights.IMAGENET1K_V1.url)
    return os.path.isfile(os.path.join(torch.hub.get_dir(), "checkpoints", filename))


class PerceptualLoss(nn.Module):
    """LPIPS (Zhang et al. 2018) on images in [-1, 1]; grayscale is repeated to three channels."""

    def __init__(self, net: str = "vgg", random_backbone: bool = False):
        super().__init__()
        import lpips

        self.lpips = lpips.LPIPS(net=net, pretrained=True, pnet_rand=random_backbone, verbose=False).eval()
        self.lpips.requires_grad_(False)

    def forward(self, images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:  # -> (N,)
        if images.shape[1] == 1:
            images, references = images.repeat(1, 3, 1, 1), references.repeat(1, 3, 1, 1)
        return self.lpips(images, references).flatten(1).mean(1)


def build_perceptual_loss(config: VAEConfig) -> PerceptualLoss | None:
    """LPIPS as configured: `auto` uses it when its backbone is on disk and says once when it is not."""
    if config.lpips is False or config.lpips_weight == 0:
        return None
    if lpips_backbone_available(config.lpips_net):
        return PerceptualLoss(config.lpips_net)
    if config.lpips == "auto":
        print(f"note: LPIPS is off: torchvision's {config.lpips_net} ImageNet weights are not in "
              f"{torch.hub.get_dir()}/checkpoints and cannot be downloaded here; training with L1 + KL + GAN")
        return None
    raise UserError(f"vae.lpips=true needs torchvision's {config.lpips_net} ImageNet weights in "
                    f"{torch.hub.get_dir()}/checkpoints; copy them there or set vae.lpips=auto")


class AutoencoderWithPosterior(nn.Module):
    """AutoencoderKL as one forward pass, images -> (reconstruction, posterior).

    DistributedDataParallel synchronises the gradients of what runs through `forward`, so training
    calls this rather than `vae.encode` / `vae.decode`. `.vae` is the AutoencoderKL itself.
    """

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, images: torch.Tensor):  # (N, C, H, W) -> (N, C, H, W), posterior over (N, c, h, w)
        posterior = self.vae.encode(images).latent_dist
        # posterior.sample()'s draw, number for number (contiguous, as its randn(mean.shape) is; the mean is a
        # strided view), but from randn_like: that randn fails under torch.compile with dynamic shapes
        # (accelerate launch --dynamo_use_dynamic: "SymIntArrayRef expected to contain only concrete integers")
        noise = torch.randn_like(posterior.mean, memory_format=torch.contiguous_format)
        return self.vae.decode(posterior.mean + posterior.std * noise).sample, posterior


def autoencoder_loss(model: nn.Module, images: torch.Tensor, config: VAEConfig, perceptual: PerceptualLoss | None = None,
                     judge: nn.Module | None = None, last_layer: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """Latent diffusion's autoencoder objective for one batch (N, C, H, W) in [-1, 1].

    `model` is an AutoencoderWithPosterior (or its DDP wrapper). L1 (+ LPIPS) reconstruction of a
    posterior sample, + kl_weight * KL per pixel, and, when a (frozen) discriminator `judge` is
    given, its generator loss weighted adaptively at the decoder's `last_layer`.
    Returns the loss, its detached terms for logging, and the reconstructions.
    """
    recon, posterior = model(images)
    rec_loss = (recon - images).abs().mean()
    if perceptual is not None:
        rec_loss = rec_loss + config.lpips_weight * perceptual(recon, images).mean()
    kl_loss = posterior.kl().mean() / images[0].numel()  # KL per pixel: LDM's weight scale
    loss = rec_loss + config.kl_weight * kl_loss
    terms = {"rec": rec_loss.detach(), "kl": kl_loss.detach()}
    if judge is not None:
        gan_loss = -judge(recon).mean()
        gan_weight = adaptive_gan_weight(rec_loss, gan_loss, last_layer) * config.disc_weight
        loss = loss + gan_weight * gan_loss
        terms.update(gan=gan_loss.detach(), gan_weight=gan_weight)
    return loss, terms, recon
