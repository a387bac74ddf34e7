"""generate: prompts in, PNG files and a labelled grid out.

    generate --run checkpoints/mnist "Draw a six" "Draw a 7" --num 8 --steps 20 --guidance 4 --seed 0 --out DIR
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, HeunDiscreteScheduler, UniPCMultistepScheduler)

from common.config import Config, run_cli
from common.errors import RunFolderError
from common.images import prompt_grid, save_image
from pipelines.latent_pipeline import LatentPipeline

SCHEDULERS = {
    "dpm++": DPMSolverMultistepScheduler, "ddim": DDIMScheduler, "ddpm": DDPMScheduler, "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler, "heun": HeunDiscreteScheduler, "unipc": UniPCMultistepScheduler,
}


def load_pipeline(run_dir: str | Path, device: str | torch.device | None = None, scheduler: str | None = None) -> LatentPipeline:
    """The run folder as a pipeline on `device` (CUDA when present); fp16 UNet/text encoder on CUDA, fp32 VAE."""
    run_dir = Path(run_dir)
    if not (run_dir / "model_index.json").is_file():
        raise RunFolderError(f"{run_dir} is not a finished run (no model_index.json); train it with `train-ldm`, "
                             f"or pass --run checkpoints/mnist for the ready-made model")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        pipe = LatentPipeline.from_pretrained(run_dir, use_safetensors=True)
    except (OSError, ValueError, EnvironmentError) as error:
        raise RunFolderError(f"cannot load the pipeline in {run_dir}: {str(error).splitlines()[0][:300]}") from None
    pipe.to(device)
    if device.type == "cuda":  # the VAE stays in fp32: fp16 VAE decoders can overflow to NaN
        pipe.unet.to(torch.float16)
        pipe.text_encoder.to(torch.float16)
    if scheduler:
        pipe.scheduler = SCHEDULERS[scheduler].from_config(pipe.scheduler.config)
    return pipe


def slug(text: str) -> str:
    return re.sub(r"[^\w]+", "-", text, flags=re.UNICODE).strip("-").lower()[:40] or "unconditional"


def main(config: Config, args: argparse.Namespace) -> list[Path]:
    pipe = load_pipeline(args.run or config.run_dir, scheduler=args.scheduler)
    steps = args.steps or config.sample.num_inference_steps
    guidance = args.guidance if args.guidance is not None else config.sample.guidance_scale
    out = Path(args.out or Path(args.run or config.run_dir) / "samples" / "generate")
    out.mkdir(parents=True, exist_ok=True)
    prompts = args.prompts or [""]
    generator = torch.Generator(pipe.device).manual_seed(args.seed)
    images = pipe(prompts, negative_prompt=args.negative, num_images_per_prompt=args.num, num_inference_steps=steps,
                  guidance_scale=guidance, generator=generator).images
    paths = []
    for i, image in enumerate(images):
        prompt_index, k = divmod(i, args.num)
        paths.append(save_image(image, out / f"{prompt_index:02d}-{slug(prompts[prompt_index])}-{k}.png"))
    labels = [p if p else "(unconditional)" for p in prompts]
    grid = save_image(prompt_grid(images, labels, args.num), out / "grid.png")
    print(f"[generate] {len(images)} images ({steps} steps, guidance {guidance}, seed {args.seed}) in {out}; grid: {grid}")
    return paths + [grid]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompts", nargs="*", help='prompts, e.g. "Draw a six"; none: unconditional samples')
    parser.add_argument("--run", help="a run folder (default: the config's run_dir)")
    parser.add_argument("--num", type=int, default=4, help="images per prompt")
    parser.add_argument("--steps", type=int, default=None, help="sampler steps (default: sample.num_inference_steps)")
    parser.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    parser.add_argument("--negative", default=None, help="negative prompt (default: the empty prompt)")
    parser.add_argument("--scheduler", choices=sorted(SCHEDULERS), default=None, help="sampler (default: the run's, DPM-Solver++)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="output folder (default: RUN/samples/generate)")


def cli(argv: list[str] | None = None) -> None:
    run_cli(__doc__.splitlines()[0], main, argv, add_arguments=add_arguments, config_required=False)


if __name__ == "__main__":
    cli()
