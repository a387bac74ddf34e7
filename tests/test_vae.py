import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from common.checkpoint import load_tensors
from common.config import VAEConfig
from common.errors import UserError
from conftest import tiny_config
from vae.model import PatchDiscriminator, PerceptualLoss, adaptive_gan_weight, build_perceptual_loss, build_vae
from vae.train import main as train_vae


def test_train_vae_writes_a_loadable_autoencoder_with_measured_scale(tmp_path):
    config = tiny_config(tmp_path / "run")
    results = train_vae(config)
    vae = AutoencoderKL.from_pretrained(tmp_path / "run" / "vae")
    assert vae.config.scaling_factor == pytest.approx(results["scaling_factor"])
    assert vae.config.scaling_factor != 1.0  # measured from the data, not the default
    assert vae.config.in_channels == 1 and vae.config.latent_channels == 4
    latents = vae.encode(torch.zeros(2, 1, 16, 16)).latent_dist.mode()
    assert latents.shape == (2, 4, 8, 8)
    metrics = json.loads((tmp_path / "run" / "vae_metrics.json").read_text())
    assert metrics["heldout_psnr"] == pytest.approx(results["heldout_psnr"]) and metrics["heldout_psnr"] > 0
    assert (tmp_path / "run" / "samples" / "vae-reconstructions.png").is_file()
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert f"run_dir: {tmp_path / 'run'}" in saved
    _, meta = load_tensors(tmp_path / "run" / "train_state" / "vae" / "state-00000004.safetensors")
    assert meta["config"]["vae"]["max_steps"] == 4  # the resolved config travels with each checkpoint
    log = [json.loads(line) for line in (tmp_path / "run" / "logs" / "vae.jsonl").read_text().splitlines()]
    assert {"rec", "kl", "gan", "disc"} <= set(log[-2])  # the GAN terms are on after disc_start


def test_resume_continues_from_the_saved_step_and_matches_an_uninterrupted_run(tmp_path):
    config = tiny_config(tmp_path / "run", "vae.max_steps=6", "vae.save_every=3")
    state = tmp_path / "run" / "train_state" / "vae"
    train_vae(config)
    straight, _ = load_tensors(state / "state-00000006.safetensors")
    (state / "state-00000006.safetensors").unlink()  # as if the run had died after step 3's checkpoint
    train_vae(config)
    resumed, meta = load_tensors(state / "state-00000006.safetensors")
    log = [json.loads(line) for line in (tmp_path / "run" / "logs" / "vae.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "rec" in r] == [1, 2, 3, 4, 5, 6, 4, 5, 6]  # the re-run started at step 4
    assert meta["step"] == 6 and straight.keys() == resumed.keys()
    worst = max((straight[k].float() - resumed[k].float()).abs().max().item() for k in straight)
    assert worst <= 1e-6


def test_lpips_code_path_with_an_untrained_backbone():
    loss = PerceptualLoss("vgg", random_backbone=True)
    images = torch.rand(2, 1, 32, 32) * 2 - 1
    assert torch.allclose(loss(images, images), torch.zeros(2), atol=1e-6)
    noisy = (images + 0.5 * torch.randn_like(images)).requires_grad_()
    value = loss(noisy, images)
    assert (value > 0).all()
    value.sum().backward()
    assert noisy.grad is not None and noisy.grad.abs().sum() > 0


def test_lpips_auto_is_off_without_backbone_weights_and_on_is_an_error(monkeypatch):
    import vae.model

    monkeypatch.setattr(vae.model, "lpips_backbone_available", lambda net: False)
    assert build_perceptual_loss(VAEConfig(lpips="auto")) is None
    assert build_perceptual_loss(VAEConfig(lpips=False)) is None
    with pytest.raises(UserError, match=r"vae.lpips=true needs torchvision's vgg ImageNet weights in .*; copy them there or set vae.lpips=auto"):
        build_perceptual_loss(VAEConfig(lpips=True))


def test_discriminator_and_adaptive_weight():
    disc = PatchDiscriminator(1, width=8, layers=2)
    logits = disc(torch.randn(3, 1, 32, 32))
    assert logits.shape[0] == 3 and logits.shape[1] == 1 and logits.shape[-1] > 1  # one logit per patch
    vae = build_vae(VAEConfig(block_out_channels=[8, 16], norm_num_groups=8), 1, 16)
    images = torch.randn(2, 1, 16, 16)
    recon = vae(images).sample
    rec = (recon - images).abs().mean()
    gan = -PatchDiscriminator(1, 8, 1)(recon).mean()
    weight = adaptive_gan_weight(rec, gan, vae.decoder.conv_out.weight)
    assert weight.ndim == 0 and 0 < weight.item() < 1e4


def test_the_latent_scale_is_measured_on_every_class():
    """scaling_factor comes from a random sample of the training images, not the first ones: on the
    class-ordered MNIST listing the first 2,048 are zeros to fours only."""
    from common.config import DataConfig
    from common.data import ImageDataset
    from vae.reconstruct import scale_sample

    train = ImageDataset(DataConfig(name="mnist"), "train")
    chosen = scale_sample(len(train), 2048)
    assert len(chosen) == 2048 == len(set(chosen)) and chosen == sorted(chosen)
    counts = np.bincount([train.labels[i] for i in chosen], minlength=10)
    assert counts.min() >= 150 and counts.max() <= 260  # about 205 of each digit
    assert sorted({train.labels[i] for i in range(2048)}) == [0, 1, 2, 3, 4]  # what the first 2,048 would be
    assert scale_sample(len(train), 2048) == chosen  # seeded


def test_the_vaes_training_forward_compiles_with_dynamic_shapes(tmp_path):
    """`accelerate launch --dynamo_use_dynamic` (compile=auto takes it): train-vae stopped at its first step, since
    diffusers' posterior.sample() draws randn(mean.shape), which torch.compile cannot trace with symbolic sizes
    ("SymIntArrayRef expected to contain only concrete integers"). The forward now draws with randn_like: the very
    numbers posterior.sample() gives (the runs' weights stay bit for bit the same), and it compiles dynamically
    (aot_eager: graph capture without inductor's code generation)."""
    from vae.model import AutoencoderWithPosterior

    torch.manual_seed(0)
    vae = build_vae(tiny_config(tmp_path).vae, 1, 16)
    model = AutoencoderWithPosterior(vae)
    images = torch.rand(8, 1, 16, 16) * 2 - 1
    torch.manual_seed(1)
    expected = vae.decode(vae.encode(images).latent_dist.sample()).sample
    torch.manual_seed(1)
    assert torch.equal(model(images)[0], expected)
    reconstruction, _ = torch.compile(model, backend="aot_eager", dynamic=True)(images)
    assert reconstruction.shape == (8, 1, 16, 16) and torch.isfinite(reconstruction).all()
