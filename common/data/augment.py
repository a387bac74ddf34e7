"""Batch augmentation on the device: one affine resampling per batch, not a per-image PIL pipeline."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from common.config import AugmentConfig


def augment_batch(images: torch.Tensor, config: AugmentConfig) -> torch.Tensor:
    """Small random rotation, zoom and shift (and optional mirror) of each image, as one resampling.

    images: (N, C, H, W) in [-1, 1], on any device. Draws come from the global RNG, which each
    training loop reseeds from (seed, rank, step) every step, so a resumed run augments identically.
    """
    if not (config.rotate_degrees or config.translate or config.scale or config.hflip):
        return images
    n = len(images)
    # drawn where the images are: a draw on the CPU would be copied to the GPU every step, and the copy from
    # pageable memory waits for everything queued on the device
    rand = torch.rand(n, 5, device=images.device) * 2 - 1  # (N, 5) uniform in [-1, 1]
    angle = rand[:, 0] * math.radians(config.rotate_degrees)
    zoom = 1.0 + rand[:, 1] * config.scale
    mirror = torch.where(rand[:, 4] < 0, -1.0, 1.0) if config.hflip else torch.ones(n, device=images.device)
    # affine_grid maps output coordinates to input ones: the inverse of rotate-zoom-shift
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    shift = rand[:, 2:4] * config.translate * 2  # normalised coordinates span [-1, 1]
    theta = torch.stack([torch.stack([cos * mirror, -sin, -shift[:, 0]], 1),
                         torch.stack([sin * mirror, cos, -shift[:, 1]], 1)], 1).to(images)  # (N, 2, 3)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    # sample (x + 1) with zero padding, so what comes in from outside is black (-1), not grey
    return F.grid_sample(images + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1
