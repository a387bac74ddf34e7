"""What `benchmark.py` measures, one function per measurement, each run in a process of its own.

Every function takes (config, device, options) and returns a JSON-able dict. `options` holds the
batch size (`batch`), the timed steps (`repeats`), the training precision (`precision`: "no",
"bf16" or "fp16", as train-ldm resolves its config on this device), the compile mode (`compile`:
"no" or a torch.compile mode) and a scratch folder (`workdir`).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from contextlib import nullcontext, redirect_stdout
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from common.config import Config
from common.config_yaml import load_config
from common.devices import fits_on
from ldm.latents import LatentCache
from ldm.model import build_noise_scheduler, build_unet, diffusion_loss, inference_scheduler
from vae.model import (AutoencoderWithPosterior, PatchDiscriminator, autoencoder_loss, build_perceptual_loss, build_vae,
                       discriminator_loss)

SAMPLE_STEPS = 20
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class PeakMemory:
    """Peak memory of a block, in a process that runs only that block (see `benchmark.main`): CUDA's
    allocator peak, or on the CPU the process's peak resident set above its resident set at the start
    (Linux resets the high-water mark through /proc/self/clear_refs). Model, optimizer state,
    activations and data all count."""

    def __init__(self, device: torch.device):
        self.device, self.peak_mb = device, 0.0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            self._base = self._status_kb("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_mb = (torch.cuda.max_memory_allocated() - self._base) / 2**20
        else:
            self.peak_mb = (self._status_kb("VmHWM") - self._base) / 1024

    @staticmethod
    def _status_kb(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise RuntimeError(f"no {field} in /proc/self/status: peak memory on the CPU needs Linux")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, warmup: int, repeats: int, rounds: int = 3) -> float:
    """Seconds per call of `fn` after `warmup` calls: the best of `rounds` rounds of `repeats` calls,
    since on a shared machine a round can be slowed by others but never sped up."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(rounds):
        sync(device)
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        sync(device)
        best = min(best, (time.perf_counter() - start) / repeats)
    return best


def autocast(device: torch.device, precision: str):
    """What accelerate does for mixed precision: autocast the forward pass (never on the CPU: see devices.py)."""
    dtype = AUTOCAST_DTYPES.get(precision)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def matmul_peak_gflops(device: torch.device, precision: str = "no", size: int = 4096) -> float:
    """The GFLOP/s of a large square matmul in the training precision (bf16 tensor cores on a GPU, fp32
    on the CPU, where a 2048 matrix already saturates two cores): the denominator of MFU."""
    size = size if device.type == "cuda" else 2048
    dtype = AUTOCAST_DTYPES.get(precision, torch.float32)
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    return 2 * size**3 / timed(lambda: a @ b, device, 3, 10) / 1e9


def train_step_fn(model: torch.nn.Module, loss_fn, device: torch.device, precision: str, fused: bool = True):
    """The bare training step: forward and loss (autocast in `precision`), backward, fused AdamW, no EMA, no logs."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused, foreach=None if fused else True)

    def step():
        with autocast(device, precision):
            loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def compiled(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    return model if mode == "no" else torch.compile(model, mode=None if mode == "default" else mode)


def out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error)


def latent_shape(config: Config) -> tuple[int, int, int]:
    factor = 2 ** (len(config.vae.block_out_channels) - 1)
    return config.vae.latent_channels, config.data.image_size // factor, config.data.image_size // factor


def vae_train(config: Config, device: torch.device, options: dict) -> dict:
    """train-vae's step on random images at the config's batch: the config's objective (L1 + KL; + LPIPS when its
    backbone is on disk; + the PatchGAN's generator and discriminator losses, as after vae.disc_start, when it is set)."""
    from vae.train import frozen
    cfg, data = config.vae, config.data
    with PeakMemory(device) as memory:
        autoencoder = AutoencoderWithPosterior(build_vae(cfg, data.channels, data.image_size)).to(device).train()
        perceptual = lpips.to(device) if (lpips := build_perceptual_loss(cfg)) is not None else None
        disc = (PatchDiscriminator(data.channels, cfg.disc_channels, cfg.disc_layers).to(device).train()
                if cfg.disc_start >= 0 and cfg.disc_weight > 0 else None)
        images = torch.rand(cfg.batch_size, data.channels, data.image_size, data.image_size, device=device) * 2 - 1
        disc_params = list(disc.parameters()) if disc is not None else []  # once, as vae/train.py makes it

        def loss() -> torch.Tensor:  # as vae/train.py's step: the discriminator frozen for the generator's loss
            with frozen(disc_params) if disc is not None else nullcontext():
                total, _, recon = autoencoder_loss(autoencoder, images, cfg, perceptual, disc, autoencoder.vae.decoder.conv_out.weight)
            return total if disc is None else total + discriminator_loss(disc, images, recon)
        step = train_step_fn(torch.nn.ModuleList([autoencoder, disc or torch.nn.Identity()]), loss, device, options["precision"])
        seconds = timed(step, device, 2, options["repeats"])
    objective = " + ".join(["L1", "KL"] + ["LPIPS"] * (perceptual is not None) + ["PatchGAN"] * (disc is not None))
    return {"images_per_s": cfg.batch_size / seconds, "peak_mb": memory.peak_mb, "batch": cfg.batch_size, "objective": objective}


def encode(config: Config, device: torch.device, options: dict) -> dict:
    """encode-dataset's inner loop: the encoder's posterior mean and std of a batch, in eval mode (fp32)."""
    data = config.data
    with PeakMemory(device) as memory, torch.no_grad():
        vae = build_vae(config.vae, data.channels, data.image_size).to(device).eval()
        batch = torch.rand(config.encode.batch_size, data.channels, data.image_size, data.image_size, device=device) * 2 - 1

        def run():
            posterior = vae.encode(batch).latent_dist
            return posterior.mean, posterior.std
        seconds = timed(run, device, 1, options["repeats"])
    return {"images_per_s": len(batch) / seconds, "peak_mb": memory.peak_mb, "batch": len(batch)}


def synthetic_cache(folder: Path, count: int, shape: tuple[int, ...], captions: int) -> LatentCache:
    """A latent cache on disk in encode-dataset's format (random latents), read through the same memory map."""
    from common.checkpoint import save_tensors
    from ldm.latents import load_cache

    save_tensors(folder / "shard-00000.safetensors", {
        "mean": torch.randn(count, *shape), "std": torch.rand(count, *shape) * 0.1, "row": torch.arange(count),
        "label": torch.arange(count) % 10, "holdout": torch.zeros(count, dtype=torch.uint8),
        "captions": (torch.arange(count) % captions)[:, None].int()}, {"key": "benchmark", "shard": 0})
    manifest = {"format": 1, "key": "benchmark", "vae": "-", "dataset": "-", "complete": True, "num_images": count,
                "shards": [{"file": "shard-00000.safetensors"}], "captions": [f"caption {i}" for i in range(captions)]}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return load_cache(folder, "-", "-")


def ldm_bare(config: Config, device: torch.device, options: dict) -> dict:
    """The ceiling train-ldm is held to: the same UNet, batch, precision and compile mode in a bare loop
    (one fixed batch; forward, backward, fused AdamW; no EMA, no logging, no data). Also the share of a
    step that train-ldm's batch assembly (gather from the latent cache, held on the device when it fits as
    train-ldm holds it; posterior sample; text states) would add, and the step's FLOPs."""
    from ldm.train import training_batch

    cfg, clip, batch_size = config.ldm, config.clip, options["batch"]
    shape = latent_shape(config)
    with PeakMemory(device) as memory, tempfile.TemporaryDirectory(dir=options["workdir"]) as folder:
        unet = build_unet(cfg, shape[0], shape[1], clip.text_hidden).to(device).train()
        noise_scheduler = build_noise_scheduler(cfg)
        # as train-ldm holds them: every caption's text states, precomputed once (captions, variants, L, D)
        caption_states = torch.randn(101, cfg.caption_variants + 1, clip.max_length, clip.text_hidden, device=device)
        cache = synthetic_cache(Path(folder), 5000, shape, 100)
        if fits_on(device, cache.nbytes):  # as train-ldm holds it
            cache = cache.to_device(device)
        generator = torch.Generator(cache.labels.device).manual_seed(0)

        def batch():
            rows = torch.randint(len(cache), (batch_size,), generator=generator, device=cache.labels.device)
            return training_batch(cache, rows, caption_states, cfg, 0.5, 100, device)

        batch_seconds = timed(batch, device, 2, 20)
        latents, states = batch()
        model = compiled(unet, options["compile"])
        step = train_step_fn(model, lambda: diffusion_loss(model, noise_scheduler, latents, states, cfg), device,
                             options["precision"])
        started = time.perf_counter()
        step()  # the first step: compilation, if any
        sync(device)
        first_step_s = time.perf_counter() - started
        seconds = timed(step, device, 2, options["repeats"])
    with FlopCounterMode(display=False) as counter:
        diffusion_loss(unet, noise_scheduler, latents, states, cfg).backward()
    return {"images_per_s": batch_size / seconds, "peak_mb": memory.peak_mb, "batch": batch_size,
            "batch_assembly_share": batch_seconds / (batch_seconds + seconds), "first_step_s": first_step_s,
            "gflop_per_step": counter.get_total_flops() / 1e9, "seconds_per_step": seconds,
            "unet_params_m": sum(p.numel() for p in unet.parameters()) / 1e6}


def prepare_run(config: Config, device: torch.device, options: dict) -> dict:
    """A run folder for `ldm_command`: train-clip and train-vae for 2 steps each (their speed is not what is
    measured; their outputs only need the right shapes), then encode-dataset of the config's whole dataset."""
    from ldm.encode import main as encode_main
    from ldm.train_clip import main as clip_main
    from vae.train import main as vae_main

    run = Path(options["workdir"]) / "stage-one"
    stage_one = load_config(options["config_path"], [f"run_dir={run}", "clip.max_steps=2", "vae.max_steps=2",
                                                     "clip.report_to=none", "vae.report_to=none"])
    started = time.perf_counter()
    with redirect_stdout(None):
        clip_main(stage_one)
        vae_main(stage_one)
        encode_main(stage_one)
    return {"run": str(run), "seconds": time.perf_counter() - started}


def ldm_command(config: Config, device: torch.device, options: dict) -> dict:
    """The train-ldm command itself (its Trainer, EMA, LR schedule, logging, device-resident data, the config's
    precision), on `prepare_run`'s run folder at batch `batch`: images/s between its log records at steps
    `n` and `2n` (the first `n` steps warm up, compilation included), from logs/ldm.jsonl."""
    from ldm.train import main as ldm_main

    steps = options["command_steps"]
    run = Path(options["workdir"]) / f"ldm-batch{options['batch']}"
    shutil.copytree(Path(options["workdir"]) / "stage-one", run)
    # exactly 2n steps (no epoch limit stopping it first) of one micro-batch each, as the bare loop's
    settings = [f"run_dir={run}", f"ldm.batch_size={options['batch']}", f"ldm.max_steps={2 * steps}", "ldm.epochs=0",
                "ldm.grad_accum=1",
                f"ldm.log_every={steps}", f"ldm.save_every={10 * steps}", f"ldm.sample_every={10 * steps}"]
    if options["compile"] != "no":
        settings.append(f"ldm.compile={options['compile']}")
    with PeakMemory(device) as memory, redirect_stdout(None):
        ldm_main(load_config(options["config_path"], settings))
    records = [json.loads(line) for line in (run / "logs" / "ldm.jsonl").read_text().splitlines()]
    logged = {r["step"]: r["time"] for r in records if "loss" in r}
    setup = next(r for r in records if r.get("event") == "setup")
    first = next(r for r in records if r.get("event") == "first_step")
    seconds = (logged[2 * steps] - logged[steps]) / steps
    if seconds <= 0:  # the log's clock reads milliseconds
        raise ValueError(f"{steps} steps of train-ldm took under a millisecond to log; time more with --command-steps")
    return {"images_per_s": options["batch"] / seconds, "peak_mb": memory.peak_mb, "batch": options["batch"],
            "seconds_per_step": seconds, "timed_steps": steps, "first_step_s": first["seconds"],
            "mixed_precision": setup["mixed_precision"], "compiled": setup["compiled"]}


def ldm_options(config: Config, device: torch.device, options: dict) -> dict:
    """train-ldm images/s with each of the field's usual speed-ups turned off or changed, one at a time,
    against the configuration train-ldm uses (PyTorch SDPA attention, fused AdamW, NCHW, the config's batch)."""
    from diffusers.models.attention_processor import AttnProcessor

    cfg, clip = config.ldm, config.clip
    shape = latent_shape(config)
    noise_scheduler = build_noise_scheduler(cfg)
    variants = {"as used": {}, "foreach AdamW instead of fused": {"fused": False},
                "channels_last": {"channels_last": True}, "attention without SDPA": {"classic_attention": True},
                "half the batch": {"batch": cfg.batch_size // 2}, "twice the batch": {"batch": cfg.batch_size * 2}}
    if cfg.batch_size < 2:  # no half of one image
        del variants["half the batch"]
    steps = {}
    for name, option in variants.items():
        torch.manual_seed(0)
        unet = build_unet(cfg, shape[0], shape[1], clip.text_hidden).to(device).train()
        if option.get("classic_attention"):
            unet.set_attn_processor(AttnProcessor())
        memory_format = torch.channels_last if option.get("channels_last") else torch.contiguous_format
        unet = unet.to(memory_format=memory_format)
        batch = option.get("batch", cfg.batch_size)
        latents = torch.randn(batch, *shape, device=device).contiguous(memory_format=memory_format)
        states = torch.randn(batch, clip.max_length, clip.text_hidden, device=device)
        loss = lambda unet=unet, latents=latents, states=states: diffusion_loss(unet, noise_scheduler, latents, states, cfg)  # noqa: E731
        steps[name] = (train_step_fn(unet, loss, device, options["precision"], fused=option.get("fused", True)), batch)
    # round robin, best of three rounds: a few percent of timing noise must not pick the winner
    results = {name: {"images_per_s": 0.0, "batch": batch} for name, (_, batch) in steps.items()}
    for _ in range(3):
        for name, (step, batch) in steps.items():
            speed = batch / timed(step, device, 1, options["repeats"], rounds=1)
            results[name]["images_per_s"] = max(results[name]["images_per_s"], speed)
    return results


def sampling(config: Config, device: torch.device, options: dict) -> dict:
    """`batch` images of one prompt, 20 DPM-Solver++ steps with guidance (one batched UNet call of 2 x batch
    per step), text encoding and VAE decode included; the pipeline in the training precision's dtype."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from ldm.text import train_tokenizer
    from pipelines import LatentPipeline

    clip, shape, batch = config.clip, latent_shape(config), options["batch"]
    with PeakMemory(device) as memory:
        unet = build_unet(config.ldm, shape[0], shape[1], clip.text_hidden).eval()
        vae = build_vae(config.vae, config.data.channels, config.data.image_size).eval()
        tokenizer = train_tokenizer(["Draw a six", "the digit six"], 300, clip.max_length)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=clip.text_hidden, intermediate_size=4 * clip.text_hidden,
            num_hidden_layers=clip.text_layers, num_attention_heads=clip.text_heads, max_position_embeddings=clip.max_length,
            bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()
        pipe = LatentPipeline(vae, text_encoder, tokenizer, unet, inference_scheduler(build_noise_scheduler(config.ldm)))
        pipe.to(device, AUTOCAST_DTYPES.get(options["precision"], torch.float32))
        pipe.set_progress_bar_config(disable=True)
        seconds = timed(lambda: pipe("Draw a six", num_images_per_prompt=batch, num_inference_steps=SAMPLE_STEPS,
                                     guidance_scale=2.0, generator=torch.Generator().manual_seed(0), output_type="pt"),
                        device, 1, 2, rounds=2)
    return {"ms_per_image": 1000 * seconds / batch, "peak_mb": memory.peak_mb, "batch": batch, "steps": SAMPLE_STEPS}


def build_peer() -> torch.nn.Module:
    """The pixel-space DDPM UNet of the Devanagari report (000_e5f5a531e913605b.txt), class-conditioned
    (num_class_embeds = 46 classes + 1 null class for classifier-free guidance)."""
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=32, in_channels=1, out_channels=1, layers_per_block=1,
        block_out_channels=(128, 128, 256, 256, 512, 512),
        down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
        num_class_embeds=47,
    )


def peer_train(config: Config, device: torch.device, options: dict) -> dict:
    """The peer's DDPM training step (epsilon MSE) at batch `batch`, in the same precision and compile mode."""
    from diffusers import DDPMScheduler

    batch = options["batch"]
    with PeakMemory(device) as memory:
        peer = build_peer().to(device).train()
        model = compiled(peer, options["compile"])
        scheduler = DDPMScheduler(num_train_timesteps=1000)
        images = torch.rand(batch, 1, 32, 32, device=device) * 2 - 1
        labels = torch.randint(47, (batch,), device=device)
        alphas = scheduler.alphas_cumprod.to(device)

        def loss():
            noise = torch.randn_like(images)
            t = torch.randint(0, 1000, (batch,), device=device)
            a = alphas[t].view(-1, 1, 1, 1)
            prediction = model(a.sqrt() * images + (1 - a).sqrt() * noise, t, class_labels=labels).sample
            return torch.nn.functional.mse_loss(prediction.float(), noise)

        seconds = timed(train_step_fn(model, loss, device, options["precision"]), device, 1,
                        max(2, options["repeats"] // 2), rounds=2)
    return {"images_per_s": batch / seconds, "peak_mb": memory.peak_mb, "batch": batch,
            "params_m": sum(p.numel() for p in peer.parameters()) / 1e6}


def peer_sampling(config: Config, device: torch.device, options: dict) -> dict:
    """`batch` images with guidance (one batched call of 2 x batch per step) in the training precision; every
    step costs the same, so a few steps are timed and scaled to 20."""
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

    measured, batch = 3, options["batch"]
    dtype = AUTOCAST_DTYPES.get(options["precision"], torch.float32)
    with PeakMemory(device) as memory, torch.no_grad():
        peer = build_peer().to(device, dtype).eval()
        sampler = DPMSolverMultistepScheduler.from_config(DDPMScheduler(num_train_timesteps=1000).config)
        sampler.set_timesteps(SAMPLE_STEPS, device=device)  # as diffusers' pipelines do: no copy per step
        x = torch.randn(batch, 1, 32, 32, device=device, dtype=dtype)
        labels = torch.cat([torch.full((batch,), 46), torch.full((batch,), 3)]).to(device)  # null, class

        def guided_step(x, t):
            uncond, cond = peer(torch.cat([x, x]), t, class_labels=labels).sample.chunk(2)
            return sampler.step(uncond + 2.0 * (cond - uncond), t, x).prev_sample

        x = guided_step(x, sampler.timesteps[0])  # warm-up
        sync(device)
        start = time.perf_counter()
        for t in sampler.timesteps[1:1 + measured]:
            x = guided_step(x, t)
        sync(device)
        per_step = (time.perf_counter() - start) / measured
    return {"ms_per_image": 1000 * per_step * SAMPLE_STEPS / batch, "peak_mb": memory.peak_mb,
            "batch": batch, "steps": SAMPLE_STEPS, "measured_steps": measured}


MEASUREMENTS = {"vae_train": vae_train, "encode": encode, "prepare_run": prepare_run, "ldm_bare": ldm_bare,
                "ldm_command": ldm_command, "ldm_options": ldm_options, "sampling": sampling,
                "peer_train": peer_train, "peer_sampling": peer_sampling}
