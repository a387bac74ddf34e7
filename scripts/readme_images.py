"""Make the pictures in the README from trained runs (MNIST, and Devanagari when it exists).

    python scripts/readme_images.py [--mnist checkpoints/mnist] [--devanagari checkpoints/devanagari]
"""

import argparse
import shutil
from pathlib import Path

import torch
from PIL import Image

from common.config_yaml import load_config
from common.images import make_grid, prompt_grid, save_image
from pipelines.generate import denoising_frames, load_pipeline, save_gif, steps_grid

OUT = Path("docs/images")


def upscaled(image: Image.Image, factor: int = 3) -> Image.Image:
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mnist", default="checkpoints/mnist")
    parser.add_argument("--devanagari", default="checkpoints/devanagari")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline(args.mnist)
    pipe.set_progress_bar_config(disable=True)
    seed = lambda s=0: torch.Generator(pipe.device).manual_seed(s)  # noqa: E731
    guidance = 1.75
    shutil.copy(Path(args.mnist) / "samples" / "quickstart" / "grid.png", OUT / "mnist-grid.png")
    for name, prompt in [("mnist-unconditional", ""), ("mnist-seven", "Draw a seven")]:
        images = pipe(prompt, num_images_per_prompt=8, guidance_scale=guidance, generator=seed()).images
        save_image(make_grid(images, 4, scale=2), OUT / f"{name}.png")
    save_image(upscaled(pipe.write("2026", guidance_scale=guidance, generator=seed(), gap=2)), OUT / "write-2026.png")
    save_image(steps_grid(pipe, "Draw a six", 0, guidance), OUT / "steps-grid.png")
    save_gif(denoising_frames(pipe, "Draw a six", 20, 0, guidance), OUT / "denoising.gif", scale=4)
    if (Path(args.devanagari) / "model_index.json").is_file():
        pipe = load_pipeline(args.devanagari)
        pipe.set_progress_bar_config(disable=True)
        guidance = load_config(Path(args.devanagari) / "config.yaml").sample.guidance_scale
        prompts = [c["prompt"] for c in pipe.classes]
        images = pipe(prompts, num_images_per_prompt=4, guidance_scale=guidance, generator=seed()).images
        labels = [f"{c['fields']['symbol']}  {c['fields']['name']}" for c in pipe.classes]
        half = (len(prompts) + 1) // 2  # two panels side by side: 23 classes each, 4 samples per class
        panels = [prompt_grid(images[4 * a:4 * b], labels[a:b], 4, scale=1) for a, b in [(0, half), (half, len(prompts))]]
        sheet = Image.new("RGB", (panels[0].width + panels[1].width + 16, panels[0].height), "white")
        sheet.paste(panels[0], (0, 0))
        sheet.paste(panels[1], (panels[0].width + 16, 0))
        save_image(upscaled(sheet, 2), OUT / "devanagari-grid.png")
        save_image(upscaled(pipe.write("क्ष त्र ज्ञ", guidance_scale=guidance, generator=seed(), gap=2)),
                   OUT / "write-devanagari.png")
    print(f"pictures in {OUT}")


if __name__ == "__main__":
    main()
