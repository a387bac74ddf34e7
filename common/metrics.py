"""Image quality metrics on tensors in [-1, 1]: PSNR and SSIM (Wang et al. 2004)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def psnr(images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB, on the [0, 1] scale. (N, C, H, W) -> (N,)."""
    a, b = (images.clamp(-1, 1) + 1) / 2, (references.clamp(-1, 1) + 1) / 2
    mse = (a - b).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(1.0 / mse)


def ssim(images: torch.Tensor, references: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM on the [0, 1] scale with the standard 11x11 Gaussian window. (N, C, H, W) -> (N,)."""
    a, b = (images.clamp(-1, 1) + 1) / 2, (references.clamp(-1, 1) + 1) / 2
    channels = a.shape[1]
    coords = torch.arange(window, dtype=a.dtype, device=a.device) - window // 2
    g = torch.exp(-coords.pow(2) / (2 * sigma**2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(channels, 1, window, window).contiguous()
    blur = lambda x: F.conv2d(x, kernel, groups=channels)  # noqa: E731  'valid' windows, as in the paper
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a.pow(2)
    var_b = blur(b * b) - mu_b.pow(2)
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a.pow(2) + mu_b.pow(2) + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1)
