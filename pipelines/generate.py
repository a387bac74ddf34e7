"""generate: prompts in, PNG files and a labelled grid out.

    generate --run checkpoints/mnist "Draw a six" "Draw a 7" --num 8 --steps 20 --guidance 4 --seed 0 --out DIR
"""

from __future__ import annotations

import argparse
import io
import math
import unicodedata
from pathlib import Path

import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, HeunDiscreteScheduler, UniPCMultistepScheduler)
from PIL import Image

from common.checkpoint import writable_folder, write_bytes
from common.cli import run_cli
from common.config import Config
from common.config_checks import seed_problem
from common.devices import allow_tf32, on_cpu, refuse_multi_process
from common.errors import RunFolderError, UserError
from common.images import make_grid, prompt_grid, save_image
from ldm.sampling import check_distinct_timesteps
from pipelines.latent_pipeline import LatentPipeline

SCHEDULERS = {
    "dpm++": DPMSolverMultistepScheduler, "ddim": DDIMScheduler, "ddpm": DDPMScheduler, "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler, "heun": HeunDiscreteScheduler, "unipc": UniPCMultistepScheduler,
}


def finished_run(run_dir: str | Path) -> Path:
    """`run_dir`, if it holds a finished run (its model_index.json); else a RunFolderError saying what to run."""
    run_dir = Path(run_dir)
    if not (run_dir / "model_index.json").is_file():
        raise RunFolderError(f"{run_dir} is not a finished run (no model_index.json); train it with `train-ldm`, "
                             f"or pass --run checkpoints/mnist for the ready-made model")
    return run_dir


def load_pipeline(run_dir: str | Path, device: str | torch.device | None = None, scheduler: str | None = None) -> LatentPipeline:
    """The run folder as a pipeline on `device` (CUDA when present); fp16 UNet/text encoder on CUDA, fp32 VAE."""
    run_dir = finished_run(run_dir)
    device = torch.device(device or ("cpu" if on_cpu() else "cuda"))
    try:
        pipe = LatentPipeline.from_pretrained(run_dir, use_safetensors=True)
    except (OSError, ValueError, EnvironmentError) as error:
        raise RunFolderError(f"cannot load the pipeline in {run_dir}: {str(error).splitlines()[0][:300]}") from None
    pipe.to(device)
    allow_tf32()  # as every command, for the fp32 VAE
    if device.type == "cuda":  # the VAE stays in fp32: fp16 VAE decoders can overflow to NaN
        pipe.unet.to(torch.float16)
        pipe.text_encoder.to(torch.float16)
    if scheduler:
        pipe.scheduler = SCHEDULERS[scheduler].from_config(pipe.scheduler.config)
    return pipe


STEPS_GRID = (1, 2, 3, 5, 10, 20, 50)


def sampler_takes(scheduler, steps: int) -> bool:
    """Whether `scheduler` can sample in `steps` steps on its model's timesteps (not more than it has)."""
    try:
        scheduler.set_timesteps(steps)
        check_distinct_timesteps(scheduler)
    except ValueError:
        return False
    return True


def steps_grid(pipe: LatentPipeline, prompt: str, seed: int, guidance_scale: float,
               steps: tuple[int, ...] = STEPS_GRID, negative_prompt: str | None = None,
               guidance_interval: tuple[float, float] | None = None) -> Image.Image:
    """The same prompt and seed sampled with 1, 2, 3, 5, 10, 20 and 50 steps, side by side and labelled."""
    images = [pipe(prompt, negative_prompt=negative_prompt, num_inference_steps=n, guidance_scale=guidance_scale,
                   guidance_interval=guidance_interval, generator=torch.Generator(pipe.device).manual_seed(seed)).images[0]
              for n in steps]
    return make_grid(images, len(images), column_labels=[f"{n} step{'s' * (n > 1)}" for n in steps],
                     row_labels=[prompt or "(unconditional)"], scale=4)


def denoising_frames(pipe: LatentPipeline, prompt: str, steps: int, seed: int, guidance_scale: float,
                     negative_prompt: str | None = None,
                     guidance_interval: tuple[float, float] | None = None) -> list[Image.Image]:
    """One sampling run's prediction of the clean image after each step, decoded through the VAE."""
    frames = []

    def keep(pipe: LatentPipeline, i: int, t: torch.Tensor, tensors: dict) -> dict:
        decoded = pipe.decode_latents(tensors["pred_original_sample"])
        frames.append(pipe.image_processor.postprocess(decoded, output_type="pil")[0])
        return {}

    pipe(prompt, negative_prompt=negative_prompt, num_inference_steps=steps, guidance_scale=guidance_scale,
         guidance_interval=guidance_interval, callback_on_step_end=keep,
         callback_on_step_end_tensor_inputs=["pred_original_sample"], generator=torch.Generator(pipe.device).manual_seed(seed))
    return frames


def save_gif(frames: list[Image.Image], path: str | Path, scale: int = 4, milliseconds: int = 150) -> Path:
    """An endlessly looping animation; the last frame is held three times as long."""
    frames = [f.resize((f.width * scale, f.height * scale), Image.Resampling.NEAREST) for f in frames]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], loop=0,
                   duration=[milliseconds] * (len(frames) - 1) + [3 * milliseconds])
    write_bytes(path, buffer.getvalue())
    return Path(path)


def slug(text: str) -> str:
    """A file-name part for `text`: its words (letters, digits, "_" and combining marks, so that Devanagari vowel
    signs and viramas stay in their word) joined by "-", lowercased, at most 40 characters."""
    kept = "".join(c if c.isalnum() or c == "_" or unicodedata.category(c) in ("Mn", "Mc") else " " for c in text)
    return "-".join(kept.split()).lower()[:40].strip("-") or "unconditional"


def check_sampling_flags(args: argparse.Namespace | None) -> None:
    """Refuse --steps, --guidance and --guidance-interval values the pipeline cannot sample with, before any work
    (`evaluate` would otherwise train its classifier first, then stop with a traceback)."""
    steps, guidance = getattr(args, "steps", None), getattr(args, "guidance", None)
    interval = getattr(args, "guidance_interval", None)
    if steps is not None and steps < 1:
        raise UserError(f"--steps must be at least 1 (got {steps}); leave it out for the run's own")
    if guidance is not None and not math.isfinite(guidance):
        raise UserError(f"--guidance must be a finite number, e.g. --guidance 1.75 (got {guidance}); leave it out for "
                        f"the run's tuned value")
    if interval is not None and not 0 <= interval[0] < interval[1] <= 1:
        raise UserError(f"--guidance-interval START STOP must have 0 <= START < STOP <= 1, the fraction of the steps "
                        f"that are guided, e.g. --guidance-interval 0.2 1.0 (got {interval[0]} {interval[1]})")


def main(config: Config, args: argparse.Namespace) -> list[Path]:
    refuse_multi_process("generate")
    if args.num < 1:
        raise UserError(f"--num must be at least 1 (got --num {args.num})")
    check_sampling_flags(args)
    if args.seed is not None and seed_problem(args.seed):  # else the pipeline loads first, then torch refuses it
        raise UserError(f"--seed {seed_problem(args.seed)}")
    if args.write is not None and not args.write.strip():  # else a blank line, or a grid nobody asked for
        raise UserError(f"--write has nothing to write ({args.write!r}): give it text, e.g. --write \"2026\", or leave it out")
    # the run first: a --run that is no run (a file, say) would otherwise read as a bad --out under it
    run_dir = finished_run(args.run or config.run_dir)
    out = writable_folder(args.out or run_dir / "samples" / "generate", "--out")
    pipe = load_pipeline(run_dir, scheduler=args.scheduler)
    try:
        return _generate(pipe, config, args, out)
    except (ValueError, FloatingPointError) as error:  # bad prompts or characters, or a guidance scale so large that
        raise UserError(str(error)) from None  # sampling overflows: the pipeline's message says what is wrong


def planned_files(prompts: list[str], args: argparse.Namespace) -> dict[str, object]:
    """The files one `generate` call writes, by what they hold: names decided before anything is sampled, so that
    files already in --out can be refused (or, with --overwrite, replaced) before any work."""
    files: dict[str, object] = {}
    if args.prompts or args.all_classes or not args.write:
        files["images"] = [f"{i:02d}-{slug(prompt)}-{k}.png" for i, prompt in enumerate(prompts) for k in range(args.num)]
        files["grid"] = "grid.png"
    if args.write:
        files["write"] = f"write-{slug(args.write)}.png"
    if args.steps_grid:
        files["steps_grid"] = "steps-grid.png"
    if args.gif:
        # numbered like the images: prompts that differ only in case or punctuation share a slug
        files["gifs"] = [f"denoising-{i:02d}-{slug(prompt)}.gif" for i, prompt in enumerate(prompts)]
    return files


def check_not_overwriting(out: Path, files: dict[str, object], overwrite: bool) -> None:
    """Refuse to replace files an earlier call wrote into --out, unless --overwrite says to."""
    names = [n for value in files.values() for n in (value if isinstance(value, list) else [value])]
    existing = [name for name in names if (out / name).exists()]
    if existing and not overwrite:
        shown = ", ".join(existing[:3]) + (f" and {len(existing) - 3} more" if len(existing) > 3 else "")
        raise UserError(f"--out {out} already holds {shown} from an earlier call; pass another --out, or --overwrite "
                        f"to replace {'them' if len(existing) > 1 else 'it'}")


def _generate(pipe: LatentPipeline, config: Config, args: argparse.Namespace, out: Path) -> list[Path]:
    steps, guidance = pipe.sampling_defaults(args.steps, args.guidance)  # the run's tuned values unless given
    seed = args.seed if args.seed is not None else config.seed
    if args.write:  # characters the run cannot draw: refused before the prompts' images are written
        pipe.segment(args.write)
    prompts = list(args.prompts)
    if args.all_classes:
        if not pipe.classes:
            raise UserError("--all-classes needs a class dataset; this run has no class table (free-form captions)")
        prompts += [c["prompt"] for c in pipe.classes]
    prompts = prompts or [""]
    files = planned_files(prompts, args)
    # a model trained on fewer timesteps than the grid's 50 steps: the counts its sampler takes, not an error after the
    # other files are written (whose advice, fewer steps, the fixed grid could not follow)
    grid_steps = tuple(n for n in STEPS_GRID if sampler_takes(pipe.scheduler, n)) if args.steps_grid else ()
    left_out = [n for n in STEPS_GRID if n not in grid_steps] if args.steps_grid else []
    if left_out:
        print(f"[generate] the steps grid leaves out {', '.join(map(str, left_out))} steps: more than "
              f"{type(pipe.scheduler).__name__} takes on this run's {pipe.scheduler.config.num_train_timesteps} timesteps")
    check_not_overwriting(out, files, args.overwrite)  # --out is made by the first file saved: none if sampling fails
    paths = []
    if "images" in files:
        generator = torch.Generator(pipe.device).manual_seed(seed)
        images = pipe(prompts, negative_prompt=args.negative, num_images_per_prompt=args.num, num_inference_steps=steps,
                      guidance_scale=guidance, generator=generator, guidance_interval=args.guidance_interval).images
        paths += [save_image(image, out / name) for image, name in zip(images, files["images"])]
        labels = [p if p else "(unconditional)" for p in prompts]
        paths.append(save_image(prompt_grid(images, labels, args.num), out / files["grid"]))
        print(f"[generate] {len(images)} images ({steps} steps, guidance {guidance}, seed {seed}) in {out}; "
              f"grid: {paths[-1]}")
    if "write" in files:
        line = pipe.write(args.write, num_inference_steps=steps, guidance_scale=guidance, guidance_interval=args.guidance_interval,
                          negative_prompt=args.negative, generator=torch.Generator(pipe.device).manual_seed(seed))
        paths.append(save_image(line, out / files["write"]))
        print(f"[generate] wrote {args.write!r}: {paths[-1]}")
    if "steps_grid" in files:
        grid = steps_grid(pipe, prompts[0], seed, guidance, grid_steps, args.negative, args.guidance_interval)
        paths.append(save_image(grid, out / files["steps_grid"]))
        print(f"[generate] steps grid for {prompts[0]!r}: {paths[-1]}")
    for prompt, name in zip(prompts, files.get("gifs", [])):
        frames = denoising_frames(pipe, prompt, steps, seed, guidance, args.negative, args.guidance_interval)
        paths.append(save_gif(frames, out / name))
        print(f"[generate] denoising animation for {prompt!r} ({len(frames)} frames): {paths[-1]}")
    return paths


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompts", nargs="*", help='prompts, e.g. "Draw a six"; none: unconditional samples')
    parser.add_argument("--all-classes", action="store_true", help="also one prompt per class of a class dataset")
    parser.add_argument("--num", type=int, default=4, help="images per prompt")
    parser.add_argument("--steps", type=int, default=None, help="sampler steps (default: the run's own)")
    parser.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: the run's tuned value)")
    parser.add_argument("--guidance-interval", nargs=2, type=float, default=None, metavar=("START", "STOP"),
                        help="guide only this fraction of the steps, e.g. 0.2 1.0 (default: the run's own)")
    parser.add_argument("--negative", default=None, help="negative prompt (default: the empty prompt)")
    parser.add_argument("--scheduler", choices=sorted(SCHEDULERS), default=None, help="sampler (default: the run's, DPM-Solver++)")
    parser.add_argument("--seed", type=int, default=None, help="default: the config's seed")
    parser.add_argument("--out", default=None, help="output folder (default: RUN/samples/generate)")
    parser.add_argument("--overwrite", action="store_true", help="replace files an earlier call wrote into --out (else refused)")
    parser.add_argument("--write", metavar="TEXT", help='also write TEXT as one line of generated glyphs, e.g. "2026" or "Hello world"')
    parser.add_argument("--steps-grid", action="store_true", help="also the first prompt after 1, 2, 3, 5, 10, 20, 50 steps")
    parser.add_argument("--gif", action="store_true", help="also an animation of each prompt's denoising")


def cli(argv: list[str] | None = None) -> None:
    run_cli(__doc__, main, argv, add_arguments=add_arguments, config_required=False)


if __name__ == "__main__":
    cli()
