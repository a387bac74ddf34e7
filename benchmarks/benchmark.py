"""How fast is each stage, and how much cheaper is latent diffusion than the pixel-space model it replaces?

    python benchmarks/benchmark.py [--config configs/mnist.yaml] [--out benchmarks/results.json]

Measures, on this machine, for the config's models (randomly initialised: speed does not depend on
the weights): VAE training images/s, encode-dataset images/s, train-ldm images/s (with the share of
each step spent assembling the batch from the memory-mapped latent cache), sampling milliseconds per
image (batch 64, 20 steps, classifier-free guidance), and the peak memory of each; then the same
training and sampling figures for the peer, the pixel-space DDPM of the Devanagari report
(diffusers UNet2DModel, 32x32x1, channels 128-128-256-256-512-512, attention in the fifth down and
second up block, with class conditioning), and the ratios. It also reports train-ldm's achieved
GFLOP/s against a float32 matmul peak measured here (model FLOPs utilisation).

Training and sampling are timed over a few steps after warm-up; the peer's sampling is timed over a
few of its 20 steps (its cost is the same every step) and scaled to 20.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.config import Config, load_config  # noqa: E402
from common.training import make_accelerator  # noqa: E402
from ldm.latents import LatentCache  # noqa: E402
from ldm.model import build_noise_scheduler, build_unet, diffusion_loss, inference_scheduler  # noqa: E402
from vae.model import autoencoder_loss, build_vae  # noqa: E402

SAMPLE_BATCH, SAMPLE_STEPS = 64, 20


class PeakMemory:
    """Peak memory of a block: CUDA's allocator peak, or on the CPU this process's resident set,
    sampled every 2 ms, above what it was at the start."""

    def __init__(self, device: torch.device):
        self.device, self.peak_mb = device, 0.0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            return self
        import psutil

        self._process = psutil.Process()
        self._base = self._peak = self._process.memory_info().rss
        self._running = True
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while self._running:
            self._peak = max(self._peak, self._process.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_mb = (torch.cuda.max_memory_allocated() - self._base) / 2**20
        else:
            self._running = False
            self._thread.join()
            self.peak_mb = (self._peak - self._base) / 2**20


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, warmup: int, repeats: int) -> float:
    """Seconds per call of `fn`, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeats


def matmul_peak_gflops(device: torch.device, size: int = 2048) -> float:
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    return 2 * size**3 / timed(lambda: a @ b, device, 3, 10) / 1e9


def train_step_fn(model: torch.nn.Module, loss_fn, lr: float = 1e-4):
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, fused=True)

    def step():
        loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def bench_vae(config: Config, device: torch.device, repeats: int) -> dict:
    cfg, data = config.vae, config.data
    vae = build_vae(cfg, data.channels, data.image_size).to(device).train()
    images = torch.rand(cfg.batch_size, data.channels, data.image_size, data.image_size, device=device) * 2 - 1
    step = train_step_fn(vae, lambda: autoencoder_loss(vae, images, cfg)[0])
    with PeakMemory(device) as memory:
        seconds = timed(step, device, 2, repeats)
    train = {"images_per_s": cfg.batch_size / seconds, "peak_mb": memory.peak_mb, "batch": cfg.batch_size}
    vae.eval()
    batch = torch.rand(config.encode.batch_size, data.channels, data.image_size, data.image_size, device=device) * 2 - 1
    with PeakMemory(device) as memory, torch.no_grad():
        seconds = timed(lambda: vae.encode(batch).latent_dist.mean, device, 1, repeats)
    encode = {"images_per_s": len(batch) / seconds, "peak_mb": memory.peak_mb, "batch": len(batch)}
    return {"vae_train": train, "encode": encode}


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


def bench_ldm(config: Config, device: torch.device, repeats: int, peak_gflops: float) -> dict:
    cfg, clip = config.ldm, config.clip
    factor = 2 ** (len(config.vae.block_out_channels) - 1)
    shape = (config.vae.latent_channels, config.data.image_size // factor, config.data.image_size // factor)
    unet = build_unet(cfg, shape[0], shape[1], clip.text_hidden).to(device).train()
    noise_scheduler = build_noise_scheduler(cfg)
    caption_states = torch.randn(101, cfg.caption_variants + 1, clip.max_length, clip.text_hidden, device=device)
    from ldm.train import training_batch

    with tempfile.TemporaryDirectory() as folder:
        cache = synthetic_cache(Path(folder), 5000, shape, 100)
        generator = torch.Generator().manual_seed(0)

        def batch():
            rows = torch.randint(len(cache), (cfg.batch_size,), generator=generator)
            return training_batch(cache, rows, caption_states, cfg, 0.5, 100, device)

        batch_seconds = timed(batch, device, 2, 20)
        latents, states = batch()
        step = train_step_fn(unet, lambda: diffusion_loss(unet, noise_scheduler, latents, states, cfg))
        with PeakMemory(device) as memory:
            seconds = timed(step, device, 2, repeats)
        with FlopCounterMode(display=False) as counter:
            diffusion_loss(unet, noise_scheduler, latents, states, cfg).backward()
        unet.zero_grad(set_to_none=True)
    gflops = counter.get_total_flops() / seconds / 1e9
    return {"images_per_s": cfg.batch_size / seconds, "peak_mb": memory.peak_mb, "batch": cfg.batch_size,
            "batch_assembly_share": batch_seconds / (batch_seconds + seconds), "gflop_per_step": counter.get_total_flops() / 1e9,
            "achieved_gflops": gflops, "mfu": gflops / peak_gflops, "unet_params_m": sum(p.numel() for p in unet.parameters()) / 1e6,
            "_unet": unet, "_noise_scheduler": noise_scheduler, "_shape": shape}


def bench_sampling(config: Config, device: torch.device, unet, noise_scheduler, shape) -> dict:
    """Batch 64, 20 DPM-Solver++ steps with guidance (one batched UNet call of 128 per step), then VAE decode."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from ldm.text import train_tokenizer
    from pipelines import LatentPipeline

    clip = config.clip
    vae = build_vae(config.vae, config.data.channels, config.data.image_size).to(device).eval()
    tokenizer = train_tokenizer(["Draw a six", "the digit six"], 300, clip.max_length)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=clip.text_hidden,
                                                intermediate_size=4 * clip.text_hidden, num_hidden_layers=clip.text_layers,
                                                num_attention_heads=clip.text_heads, max_position_embeddings=clip.max_length,
                                                bos_token_id=0, eos_token_id=1, pad_token_id=1)).to(device).eval()
    pipe = LatentPipeline(vae, text_encoder, tokenizer, unet.eval(), inference_scheduler(noise_scheduler))
    pipe.set_progress_bar_config(disable=True)
    run = lambda: pipe("Draw a six", num_images_per_prompt=SAMPLE_BATCH, num_inference_steps=SAMPLE_STEPS,  # noqa: E731
                       guidance_scale=2.0, generator=torch.Generator().manual_seed(0), output_type="pt")
    with PeakMemory(device) as memory:
        seconds = timed(run, device, 1, 2)
    return {"ms_per_image": 1000 * seconds / SAMPLE_BATCH, "peak_mb": memory.peak_mb, "batch": SAMPLE_BATCH, "steps": SAMPLE_STEPS}


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


def bench_peer(device: torch.device, batch: int, repeats: int) -> dict:
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

    peer = build_peer().to(device).train()
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    images = torch.rand(batch, 1, 32, 32, device=device) * 2 - 1
    labels = torch.randint(47, (batch,), device=device)

    def loss():
        noise = torch.randn_like(images)
        t = torch.randint(0, 1000, (batch,), device=device)
        return torch.nn.functional.mse_loss(peer(scheduler.add_noise(images, noise, t), t, class_labels=labels).sample, noise)

    with PeakMemory(device) as memory:
        seconds = timed(train_step_fn(peer, loss), device, 1, repeats)
    train = {"images_per_s": batch / seconds, "peak_mb": memory.peak_mb, "batch": batch,
             "params_m": sum(p.numel() for p in peer.parameters()) / 1e6}

    peer.eval()
    sampler = DPMSolverMultistepScheduler.from_config(scheduler.config)
    sampler.set_timesteps(SAMPLE_STEPS)
    x = torch.randn(SAMPLE_BATCH, 1, 32, 32, device=device)
    both = torch.cat([labels.new_full((SAMPLE_BATCH,), 46), labels.new_full((SAMPLE_BATCH,), 3)])  # null, class

    @torch.no_grad()
    def guided_step(x, t):
        uncond, cond = peer(torch.cat([x, x]), t, class_labels=both).sample.chunk(2)
        return sampler.step(uncond + 2.0 * (cond - uncond), t, x).prev_sample

    measured = 3
    with PeakMemory(device) as memory:
        guided_step(x, sampler.timesteps[0])  # warm-up
        sync(device)
        start = time.perf_counter()
        for t in sampler.timesteps[1:1 + measured]:
            x = guided_step(x, t)
        sync(device)
        per_step = (time.perf_counter() - start) / measured
    sample = {"ms_per_image": 1000 * per_step * SAMPLE_STEPS / SAMPLE_BATCH, "peak_mb": memory.peak_mb,
              "batch": SAMPLE_BATCH, "steps": SAMPLE_STEPS, "measured_steps": measured}
    return {"peer_train": train, "peer_sampling": sample}


def describe_machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/mnist.yaml")
    parser.add_argument("--out", default="benchmarks/results.json")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per measurement")
    args = parser.parse_args()
    config = load_config(args.config)
    device = make_accelerator("no").device
    torch.manual_seed(0)
    started = time.time()
    results: dict = {"machine": describe_machine(device), "device": device.type, "torch": torch.__version__,
                     "config": args.config}
    results["matmul_peak_gflops"] = matmul_peak_gflops(device)
    results.update(bench_vae(config, device, args.repeats))
    ldm = bench_ldm(config, device, args.repeats, results["matmul_peak_gflops"])
    unet, noise_scheduler, shape = ldm.pop("_unet"), ldm.pop("_noise_scheduler"), ldm.pop("_shape")
    results["ldm_train"] = ldm
    results["sampling"] = bench_sampling(config, device, unet, noise_scheduler, shape)
    results.update(bench_peer(device, config.ldm.batch_size, max(2, args.repeats // 2)))
    results["ratios"] = {
        "train_images_per_s_ldm_over_peer": results["ldm_train"]["images_per_s"] / results["peer_train"]["images_per_s"],
        "sampling_cost_peer_over_ldm": results["peer_sampling"]["ms_per_image"] / results["sampling"]["ms_per_image"],
    }
    results["benchmark_seconds"] = time.time() - started
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(table(results))


def table(r: dict) -> str:
    rows = [
        ("VAE training", f"{r['vae_train']['images_per_s']:.0f} img/s", f"{r['vae_train']['peak_mb']:.0f} MB", f"batch {r['vae_train']['batch']}"),
        ("encode-dataset", f"{r['encode']['images_per_s']:.0f} img/s", f"{r['encode']['peak_mb']:.0f} MB", f"batch {r['encode']['batch']}"),
        ("train-ldm", f"{r['ldm_train']['images_per_s']:.0f} img/s", f"{r['ldm_train']['peak_mb']:.0f} MB",
         f"batch {r['ldm_train']['batch']}, {r['ldm_train']['unet_params_m']:.2f}M params, "
         f"batch assembly {100 * r['ldm_train']['batch_assembly_share']:.1f}% of a step"),
        ("sampling", f"{r['sampling']['ms_per_image']:.1f} ms/img", f"{r['sampling']['peak_mb']:.0f} MB",
         f"batch {SAMPLE_BATCH}, {SAMPLE_STEPS} steps, CFG, incl. VAE decode"),
        ("peer training", f"{r['peer_train']['images_per_s']:.1f} img/s", f"{r['peer_train']['peak_mb']:.0f} MB",
         f"batch {r['peer_train']['batch']}, {r['peer_train']['params_m']:.1f}M params"),
        ("peer sampling", f"{r['peer_sampling']['ms_per_image']:.1f} ms/img", f"{r['peer_sampling']['peak_mb']:.0f} MB",
         f"batch {SAMPLE_BATCH}, {SAMPLE_STEPS} steps, CFG ({r['peer_sampling']['measured_steps']} steps timed)"),
    ]
    lines = [f"machine: {r['machine']} (torch {r['torch']}, {r['device']})", "",
             "| measurement | speed | peak memory | notes |", "| --- | --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    lines += ["", f"train-ldm vs peer, training images/s: {r['ratios']['train_images_per_s_ldm_over_peer']:.1f}x",
              f"peer vs latent sampling cost per image: {r['ratios']['sampling_cost_peer_over_ldm']:.1f}x",
              f"train-ldm: {r['ldm_train']['gflop_per_step']:.1f} GFLOP/step, {r['ldm_train']['achieved_gflops']:.1f} GFLOP/s "
              f"achieved vs {r['matmul_peak_gflops']:.1f} GFLOP/s fp32 matmul peak = {100 * r['ldm_train']['mfu']:.0f}% MFU",
              f"(benchmark took {r['benchmark_seconds']:.0f} s)"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
