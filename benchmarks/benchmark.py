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

Each measurement runs in a fresh process, so its peak memory (model, optimizer state, activations
and data; CUDA's allocator peak, or the CPU process's peak resident set) is its own. Training and
sampling are timed over a few steps after warm-up; the peer's sampling is timed over a few of its
20 steps (its cost is the same every step) and scaled to 20.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.checkpoint import writable_file  # noqa: E402
from common.config import Config, ConfigError  # noqa: E402
from common.config_yaml import load_config  # noqa: E402
from common.devices import make_accelerator  # noqa: E402
from common.errors import UserError  # noqa: E402
from ldm.latents import LatentCache  # noqa: E402
from ldm.model import build_noise_scheduler, build_unet, diffusion_loss, inference_scheduler  # noqa: E402
from vae.model import AutoencoderWithPosterior, autoencoder_loss, build_vae  # noqa: E402

SAMPLE_BATCH, SAMPLE_STEPS = 64, 20
RESULT = "benchmark-result: "


class PeakMemory:
    """Peak memory of a block, in a process that runs only that block (see `main`): CUDA's allocator
    peak, or on the CPU the process's peak resident set above its resident set at the start (Linux
    resets the high-water mark through /proc/self/clear_refs). Model, optimizer state, activations
    and data all count."""

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


def matmul_peak_gflops(device: torch.device, size: int = 2048) -> float:
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    return 2 * size**3 / timed(lambda: a @ b, device, 3, 10) / 1e9


def train_step_fn(model: torch.nn.Module, loss_fn, lr: float = 1e-4, fused: bool = True):
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, fused=fused, foreach=None if fused else True)

    def step():
        loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def bench_vae_train(config: Config, device: torch.device, repeats: int) -> dict:
    cfg, data = config.vae, config.data
    with PeakMemory(device) as memory:
        autoencoder = AutoencoderWithPosterior(build_vae(cfg, data.channels, data.image_size)).to(device).train()
        images = torch.rand(cfg.batch_size, data.channels, data.image_size, data.image_size, device=device) * 2 - 1
        # the config's objective (MNIST: L1 + KL; LPIPS and the discriminator only when the config turns them on)
        seconds = timed(train_step_fn(autoencoder, lambda: autoencoder_loss(autoencoder, images, cfg)[0]), device, 2, repeats)
    return {"images_per_s": cfg.batch_size / seconds, "peak_mb": memory.peak_mb, "batch": cfg.batch_size}


def bench_encode(config: Config, device: torch.device, repeats: int) -> dict:
    """encode-dataset's inner loop: the encoder's posterior mean and std of a batch, in eval mode."""
    data = config.data
    with PeakMemory(device) as memory, torch.no_grad():
        vae = build_vae(config.vae, data.channels, data.image_size).to(device).eval()
        batch = torch.rand(config.encode.batch_size, data.channels, data.image_size, data.image_size, device=device) * 2 - 1

        def encode():
            posterior = vae.encode(batch).latent_dist
            return posterior.mean, posterior.std
        seconds = timed(encode, device, 1, repeats)
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


def latent_shape(config: Config) -> tuple[int, int, int]:
    factor = 2 ** (len(config.vae.block_out_channels) - 1)
    return config.vae.latent_channels, config.data.image_size // factor, config.data.image_size // factor


def bench_ldm_train(config: Config, device: torch.device, repeats: int) -> dict:
    cfg, clip = config.ldm, config.clip
    shape = latent_shape(config)
    from ldm.train import training_batch

    with PeakMemory(device) as memory, tempfile.TemporaryDirectory() as folder:
        unet = build_unet(cfg, shape[0], shape[1], clip.text_hidden).to(device).train()
        noise_scheduler = build_noise_scheduler(cfg)
        # as train-ldm holds them: every caption's text states, precomputed once (captions, variants, L, D)
        caption_states = torch.randn(101, cfg.caption_variants + 1, clip.max_length, clip.text_hidden, device=device)
        cache = synthetic_cache(Path(folder), 5000, shape, 100)
        generator = torch.Generator().manual_seed(0)

        def batch():
            rows = torch.randint(len(cache), (cfg.batch_size,), generator=generator)
            return training_batch(cache, rows, caption_states, cfg, 0.5, 100, device)

        batch_seconds = timed(batch, device, 2, 20)
        latents, states = batch()
        seconds = timed(train_step_fn(unet, lambda: diffusion_loss(unet, noise_scheduler, latents, states, cfg)),
                        device, 2, repeats)
    with FlopCounterMode(display=False) as counter:
        diffusion_loss(unet, noise_scheduler, latents, states, cfg).backward()
    return {"images_per_s": cfg.batch_size / seconds, "peak_mb": memory.peak_mb, "batch": cfg.batch_size,
            "batch_assembly_share": batch_seconds / (batch_seconds + seconds),
            "gflop_per_step": counter.get_total_flops() / 1e9, "seconds_per_step": seconds,
            "unet_params_m": sum(p.numel() for p in unet.parameters()) / 1e6}


def bench_ldm_options(config: Config, device: torch.device, repeats: int) -> dict:
    """train-ldm images/s with each of the field's usual speed-ups turned off or changed, one at a time,
    against the configuration train-ldm uses (PyTorch SDPA attention, fused AdamW, NCHW, the config's batch)."""
    from diffusers.models.attention_processor import AttnProcessor

    cfg, clip = config.ldm, config.clip
    shape = latent_shape(config)
    noise_scheduler = build_noise_scheduler(cfg)
    variants = {"as used": {}, "foreach AdamW instead of fused": {"fused": False},
                "channels_last": {"channels_last": True}, "attention without SDPA": {"classic_attention": True},
                "half the batch": {"batch": cfg.batch_size // 2}, "twice the batch": {"batch": cfg.batch_size * 2}}
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
        steps[name] = (train_step_fn(unet, loss, fused=option.get("fused", True)), batch)
    # round robin, best of three rounds: a few percent of timing noise must not pick the winner
    results = {name: {"images_per_s": 0.0, "batch": batch} for name, (_, batch) in steps.items()}
    for _ in range(3):
        for name, (step, batch) in steps.items():
            speed = batch / timed(step, device, 1, repeats, rounds=1)
            results[name]["images_per_s"] = max(results[name]["images_per_s"], speed)
    return results


def bench_sampling(config: Config, device: torch.device, repeats: int) -> dict:
    """Batch 64, 20 DPM-Solver++ steps with guidance (one batched UNet call of 128 per step), then VAE decode."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from ldm.text import train_tokenizer
    from pipelines import LatentPipeline

    clip, shape = config.clip, latent_shape(config)
    with PeakMemory(device) as memory:
        unet = build_unet(config.ldm, shape[0], shape[1], clip.text_hidden).to(device).eval()
        vae = build_vae(config.vae, config.data.channels, config.data.image_size).to(device).eval()
        tokenizer = train_tokenizer(["Draw a six", "the digit six"], 300, clip.max_length)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=clip.text_hidden, intermediate_size=4 * clip.text_hidden,
            num_hidden_layers=clip.text_layers, num_attention_heads=clip.text_heads, max_position_embeddings=clip.max_length,
            bos_token_id=0, eos_token_id=1, pad_token_id=1)).to(device).eval()
        pipe = LatentPipeline(vae, text_encoder, tokenizer, unet, inference_scheduler(build_noise_scheduler(config.ldm)))
        pipe.set_progress_bar_config(disable=True)
        seconds = timed(lambda: pipe("Draw a six", num_images_per_prompt=SAMPLE_BATCH, num_inference_steps=SAMPLE_STEPS,
                                     guidance_scale=2.0, generator=torch.Generator().manual_seed(0), output_type="pt"),
                        device, 1, 2, rounds=2)
    return {"ms_per_image": 1000 * seconds / SAMPLE_BATCH, "peak_mb": memory.peak_mb, "batch": SAMPLE_BATCH,
            "steps": SAMPLE_STEPS}


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


def bench_peer_train(config: Config, device: torch.device, repeats: int) -> dict:
    """The peer's DDPM training step (epsilon MSE) at train-ldm's batch size."""
    from diffusers import DDPMScheduler

    batch = config.ldm.batch_size
    with PeakMemory(device) as memory:
        peer = build_peer().to(device).train()
        scheduler = DDPMScheduler(num_train_timesteps=1000)
        images = torch.rand(batch, 1, 32, 32, device=device) * 2 - 1
        labels = torch.randint(47, (batch,), device=device)

        def loss():
            noise = torch.randn_like(images)
            t = torch.randint(0, 1000, (batch,), device=device)
            prediction = peer(scheduler.add_noise(images, noise, t), t, class_labels=labels).sample
            return torch.nn.functional.mse_loss(prediction, noise)

        seconds = timed(train_step_fn(peer, loss), device, 1, max(2, repeats // 2), rounds=2)
    return {"images_per_s": batch / seconds, "peak_mb": memory.peak_mb, "batch": batch,
            "params_m": sum(p.numel() for p in peer.parameters()) / 1e6}


def bench_peer_sampling(config: Config, device: torch.device, repeats: int) -> dict:
    """Batch 64 with guidance (one batched call of 128 per step); every step costs the same, so a few
    steps are timed and scaled to 20."""
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

    measured = 3
    with PeakMemory(device) as memory, torch.no_grad():
        peer = build_peer().to(device).eval()
        sampler = DPMSolverMultistepScheduler.from_config(DDPMScheduler(num_train_timesteps=1000).config)
        sampler.set_timesteps(SAMPLE_STEPS)
        x = torch.randn(SAMPLE_BATCH, 1, 32, 32, device=device)
        labels = torch.cat([torch.full((SAMPLE_BATCH,), 46), torch.full((SAMPLE_BATCH,), 3)]).to(device)  # null, class

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
    return {"ms_per_image": 1000 * per_step * SAMPLE_STEPS / SAMPLE_BATCH, "peak_mb": memory.peak_mb,
            "batch": SAMPLE_BATCH, "steps": SAMPLE_STEPS, "measured_steps": measured}


MEASUREMENTS = {"vae_train": bench_vae_train, "encode": bench_encode, "ldm_train": bench_ldm_train,
                "ldm_options": bench_ldm_options, "sampling": bench_sampling, "peer_train": bench_peer_train, "peer_sampling": bench_peer_sampling}


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/mnist.yaml")
    parser.add_argument("--out", default="benchmarks/results.json")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per measurement")
    parser.add_argument("--only", choices=sorted(MEASUREMENTS), help=argparse.SUPPRESS)  # one measurement, as JSON
    args = parser.parse_args(argv)
    if args.repeats < 1:  # else each measurement divides by zero, in its child process, after the matmul peak
        parser.error(f"--repeats must be at least 1 (got {args.repeats})")
    try:
        config = load_config(args.config)
        if not args.only:  # the results are written after minutes of measuring: a path that cannot take them fails now
            writable_file(args.out, "--out", "results.json")
    except (ConfigError, UserError) as error:  # one line, as the commands say it, not a traceback
        parser.error(str(error))
    device = make_accelerator("no").device
    torch.manual_seed(0)
    if args.only:
        print(RESULT + json.dumps(MEASUREMENTS[args.only](config, device, args.repeats)))
        return

    started = time.time()
    results: dict = {"machine": describe_machine(device), "device": device.type, "torch": torch.__version__,
                     "config": args.config, "matmul_peak_gflops": matmul_peak_gflops(device)}
    for name in MEASUREMENTS:  # each in a fresh process, so that one's memory does not hide in another's
        print(f"[benchmark] {name} ...", flush=True)
        child = subprocess.run([sys.executable, __file__, "--config", args.config, "--repeats", str(args.repeats),
                                "--only", name], capture_output=True, text=True)
        lines = [line for line in child.stdout.splitlines() if line.startswith(RESULT)]
        if child.returncode != 0 or not lines:
            raise SystemExit(f"{name} failed:\n{child.stdout[-2000:]}{child.stderr[-3000:]}")
        results[name] = json.loads(lines[-1][len(RESULT):])
    ldm = results["ldm_train"]
    ldm["achieved_gflops"] = ldm["gflop_per_step"] / ldm["seconds_per_step"]
    ldm["mfu"] = ldm["achieved_gflops"] / results["matmul_peak_gflops"]
    results["ratios"] = {
        "train_images_per_s_ldm_over_peer": ldm["images_per_s"] / results["peer_train"]["images_per_s"],
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
              "", "train-ldm speed-ups, one changed at a time:", "", "| variant | images/s | vs as used |", "| --- | --- | --- |"]
    base = r["ldm_options"]["as used"]["images_per_s"]
    lines += [f"| {name} (batch {v['batch']}) | {v['images_per_s']:.0f} | {v['images_per_s'] / base:.2f}x |"
              for name, v in r["ldm_options"].items()]
    lines += ["", f"(benchmark took {r['benchmark_seconds']:.0f} s)"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
