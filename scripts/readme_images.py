"""Make the pictures in the README from trained runs (MNIST; Devanagari, letters and the fine-tuning
recipe's runs when they exist).

    python scripts/readme_images.py [--mnist checkpoints/mnist] [--devanagari checkpoints/devanagari]
        [--letters checkpoints/letters] [--finetune checkpoints/mnist-finetune] [--lora checkpoints/mnist-lora]
"""

import argparse
import shutil
from pathlib import Path

import torch
from PIL import Image

from common.images import make_grid, prompt_grid, save_image
from pipelines.generate import denoising_frames, load_pipeline, save_gif, steps_grid

OUT = Path("docs/images")


def upscaled(image: Image.Image, factor: int = 3) -> Image.Image:
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mnist", default="checkpoints/mnist")
    # each run's pictures are drawn when it has this file: the defaults are left out when they are not there, but a
    # folder named on the command line would then be left out silently too
    optional = {"devanagari": ("checkpoints/devanagari", "model_index.json"),
                "letters": ("checkpoints/letters", "model_index.json"),
                "finetune": ("checkpoints/mnist-finetune", "model_index.json"),
                "lora": ("checkpoints/mnist-lora", "pytorch_lora_weights.safetensors")}
    for name, (default, _) in optional.items():
        parser.add_argument(f"--{name}", help=f"default: {default}, left out when it is not there")
    args = parser.parse_args(argv)
    if not (Path(args.mnist) / "model_index.json").is_file():  # before any picture is replaced
        parser.error(f"--mnist {args.mnist} is not a finished run (no model_index.json); the ready-made one is checkpoints/mnist")
    for name, (default, needed) in optional.items():
        given = getattr(args, name)
        if given is not None and not (Path(given) / needed).is_file():
            parser.error(f"--{name} {given} has no {needed}, so its pictures could not be drawn; leave --{name} out, "
                         f"or name a folder that has one")
        setattr(args, name, given or default)
    OUT.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline(args.mnist)
    pipe.set_progress_bar_config(disable=True)
    seed = lambda s=0: torch.Generator(pipe.device).manual_seed(s)  # noqa: E731
    # every picture is the default call: the run's own tuned steps, guidance and guided interval
    steps, guidance = pipe.sampling_defaults()
    if (Path(args.mnist) / "samples" / "quickstart" / "grid.png").is_file():  # a quickstart run, not the shipped copy
        shutil.copy(Path(args.mnist) / "samples" / "quickstart" / "grid.png", OUT / "mnist-grid.png")
    for name, prompt in [("mnist-unconditional", ""), ("mnist-seven", "Draw a seven")]:
        images = pipe(prompt, num_images_per_prompt=8, generator=seed()).images
        save_image(make_grid(images, 4, scale=2), OUT / f"{name}.png")
    save_image(upscaled(pipe.write("2026", generator=seed(), gap=2)), OUT / "write-2026.png")
    save_image(steps_grid(pipe, "Draw a six", 0, guidance), OUT / "steps-grid.png")
    save_gif(denoising_frames(pipe, "Draw a six", steps, 0, guidance), OUT / "denoising.gif", scale=4)
    if (Path(args.devanagari) / "model_index.json").is_file():
        pipe = load_pipeline(args.devanagari)
        pipe.set_progress_bar_config(disable=True)
        prompts = [c["prompt"] for c in pipe.classes]
        images = pipe(prompts, num_images_per_prompt=4, generator=seed()).images
        labels = [f"{c['fields']['symbol']}  {c['fields']['name']}" for c in pipe.classes]
        half = (len(prompts) + 1) // 2  # two panels side by side: 23 classes each, 4 samples per class
        save_image(upscaled(class_panels(images, labels, half), 2), OUT / "devanagari-grid.png")
        save_image(upscaled(pipe.write("क्ष त्र ज्ञ", generator=seed(), gap=2)),
                   OUT / "write-devanagari.png")
    if (Path(args.letters) / "model_index.json").is_file():
        letters(args.letters, seed)
    if (Path(args.finetune) / "model_index.json").is_file() and (Path(args.lora) / "pytorch_lora_weights.safetensors").is_file():
        finetuning(args.mnist, args.finetune, args.lora, seed)
    print(f"pictures in {OUT}")


def class_panels(images: list[Image.Image], labels: list[str], per_panel: int, per_class: int = 4,
                 gap: int = 16) -> Image.Image:
    """Labelled class rows (`per_class` samples each), `per_panel` classes to a panel, panels side by side."""
    panels = [prompt_grid(images[per_class * a:per_class * min(a + per_panel, len(labels))], labels[a:a + per_panel],
                          per_class, scale=1) for a in range(0, len(labels), per_panel)]
    sheet = Image.new("RGB", (sum(p.width for p in panels) + gap * (len(panels) - 1), panels[0].height), "white")
    x = 0
    for panel in panels:
        sheet.paste(panel, (x, 0))
        x += panel.width + gap
    return sheet


def letters(run: str, seed) -> None:
    """All 62 classes (4 samples each), and sentences written with write(), at the run's own defaults."""
    pipe = load_pipeline(run)
    pipe.set_progress_bar_config(disable=True)
    prompts = [c["prompt"] for c in pipe.classes]
    images = pipe(prompts, num_images_per_prompt=4, generator=seed()).images
    labels = [c["fields"]["symbol"] for c in pipe.classes]
    save_image(upscaled(class_panels(images, labels, 16), 2), OUT / "letters-grid.png")  # four panels of 16 classes
    for name, text in [("write-hello-world", "Hello world"),
                       ("write-quick-brown-fox", "The quick brown fox jumps over the lazy dog")]:
        save_image(upscaled(pipe.write(text, generator=seed()), 2), OUT / f"{name}.png")
    shutil.copy(Path(run) / "loss.png", OUT / "loss-letters.png")


def finetuning(base: str, full: str, lora: str, seed) -> None:
    """One row per model: the base, the base with the LoRA loaded, the fully fine-tuned run; digits 0-9."""
    prompts = [c["prompt"] for c in load_pipeline(base).classes]  # "Draw a zero" ... "Draw a nine"
    rows, labels = [], []
    for label, run, adapters in [("base", base, None), ("base + LoRA", base, lora), ("full fine-tune", full, None)]:
        pipe = load_pipeline(run)
        pipe.set_progress_bar_config(disable=True)
        if adapters:
            pipe.load_lora_weights(adapters)
        rows += pipe(prompts, generator=seed()).images
        labels.append(label)
    save_image(upscaled(prompt_grid(rows, labels, len(prompts), scale=1), 2), OUT / "finetune-digits.png")


if __name__ == "__main__":
    main()
