"""The measures `evaluate` and `train-vae` report, on inputs whose answer is known."""

import math

import pytest
import torch

from common.metrics import psnr, ssim
from pipelines.quality import frechet_distance, mean_pairwise_distance, near_copy_rate, relative_diversity


def test_psnr_of_a_known_error_and_ssim_of_identical_images():
    a = torch.zeros(2, 1, 16, 16)  # grey, 0.5 on the [0, 1] scale
    b = a + 0.2  # 0.1 off on the [0, 1] scale: MSE 0.01 -> 20 dB
    assert psnr(b, a).tolist() == pytest.approx([20.0, 20.0], abs=1e-4)
    images = torch.rand(3, 1, 16, 16) * 2 - 1
    assert ssim(images, images).tolist() == pytest.approx([1.0] * 3, abs=1e-6)
    assert (ssim(images, -images) < 0.5).all()


def test_frechet_distance_of_a_shifted_copy_is_the_squared_shift():
    features = torch.randn(500, 4, generator=torch.Generator().manual_seed(0)).double()
    shift = torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=torch.float64)
    assert frechet_distance(features, features) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(features, features + shift) == pytest.approx(5.25, abs=1e-6)
    # different covariances: diagonal 1 vs 4 in one dimension gives (1 + 4 - 2 * 2) = 1 more
    scaled = features.clone()
    scaled[:, 0] = (scaled[:, 0] - scaled[:, 0].mean()) * 2 + scaled[:, 0].mean()
    assert frechet_distance(features, scaled) == pytest.approx(features[:, 0].var().item(), rel=1e-4)


def test_mean_pairwise_distance_and_near_copies():
    points = torch.tensor([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0]])  # distances 5, 5, 10
    assert mean_pairwise_distance(points) == pytest.approx(20 / 3)
    assert math.isnan(mean_pairwise_distance(points[:1]))
    train = torch.rand(60, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    assert near_copy_rate(train[:10].clone(), train) == 1.0  # exact copies
    fresh = torch.rand(10, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    assert near_copy_rate(fresh, train) == 0.0


def test_relative_diversity_of_held_out_images_all_alike_is_nan_not_a_crash():
    """Before: ZeroDivisionError from evaluate when each class's held-out images were identical."""
    generated = torch.tensor([[0.0, 0.0], [3.0, 4.0], [1.0, 1.0], [1.0, 1.0]])
    labels = torch.tensor([0, 0, 1, 1])
    alike = relative_diversity(generated, labels, torch.ones(4, 2), labels, num_classes=2)
    assert math.isnan(alike["relative"]) and alike["generated"] == 2.5 and alike["heldout"] == 0.0
    spread = relative_diversity(generated, labels, torch.tensor([[0.0, 0.0], [0.0, 1.0], [0.0, 0.0], [0.0, 1.0]]), labels, 2)
    assert spread == {"relative": 2.5, "generated": 2.5, "heldout": 1.0}
