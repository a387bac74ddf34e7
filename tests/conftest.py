"""Shared test helpers: tiny configs, small generated image folders, and one tiny trained run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings
from PIL import Image, ImageDraw

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# configs/tiny.yaml asks for deterministic kernels; on a GPU cuBLAS reads this before its first matmul
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

# The property tests are deterministic by default, so CI never fails on a draw nobody can replay;
# HYPOTHESIS_PROFILE=explore draws fresh random examples to look for new faults.
settings.register_profile("ci", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def tiny_config(run_dir: Path | str, *overrides: str):
    """configs/tiny.yaml with its run folder under the test's tmp_path."""
    from common.config_yaml import load_config

    return load_config(TINY, [f"run_dir={run_dir}", *overrides])


def shape_image(kind: str, size: tuple[int, int], mode: str = "RGB", seed: int = 0) -> Image.Image:
    """A coloured circle, square or triangle on black, slightly different for each seed."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", size, (0, 0, 0))
    draw = ImageDraw.Draw(image)
    w, h = size
    m = int(min(w, h) * (0.15 + 0.1 * rng.random()))
    color = tuple(int(c) for c in rng.integers(80, 256, 3))
    box = (m, m, w - m, h - m)
    if kind == "circle":
        draw.ellipse(box, fill=color)
    elif kind == "square":
        draw.rectangle(box, fill=color)
    else:
        draw.polygon([(w // 2, m), (w - m, h - m), (m, h - m)], fill=color)
    return image.convert(mode)


@pytest.fixture
def class_folder(tmp_path: Path) -> Path:
    """root/<class>/*.png with odd sizes and a mix of modes (RGB, L, RGBA, P)."""
    root = tmp_path / "shapes"
    modes = ["RGB", "L", "RGBA", "P"]
    for c, kind in enumerate(["circle", "square", "triangle"]):
        (root / kind).mkdir(parents=True)
        for i in range(6):
            size = (20 + 7 * i, 33 - 2 * i)  # non-square, odd sizes
            shape_image(kind, size, modes[(i + c) % 4], seed=10 * c + i).save(root / kind / f"{i:03d}.png")
    return root


@pytest.fixture
def flowers_folder(tmp_path: Path) -> Path:
    """A flat folder of class_index.jpg files (the flowers layout)."""
    root = tmp_path / "flowers"
    root.mkdir()
    for kind, name in [("circle", "orchids"), ("square", "tulips")]:
        for i in range(5):
            shape_image(kind, (48, 40), seed=i).save(root / f"{name}_{i:04d}.jpg", quality=90)
    return root


@pytest.fixture
def jsonl_folder(tmp_path: Path) -> Path:
    """A folder with metadata.jsonl and free-form captions."""
    root = tmp_path / "captioned"
    (root / "images").mkdir(parents=True)
    lines = []
    for i in range(12):
        kind = ["circle", "square", "triangle"][i % 3]
        shape_image(kind, (24, 24), seed=i).save(root / "images" / f"{i}.png")
        lines.append(json.dumps({"file_name": f"images/{i}.png", "text": f"a bright {kind} number {i}"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """One tiny run of the whole chain (train-clip, train-vae, encode-dataset, train-ldm), shared by tests
    that only read it. Tests that change a run copy it first."""
    from ldm.encode import main as encode_main
    from ldm.train import main as ldm_main
    from ldm.train_clip import main as clip_main
    from vae.train import main as vae_main

    run = tmp_path_factory.mktemp("tiny") / "run"
    config = tiny_config(run)
    clip_main(config)
    vae_main(config)
    encode_main(config)
    ldm_main(config)
    return run


@pytest.fixture(scope="module")
def pipe(tiny_run):
    """The tiny run as a LatentPipeline, loaded once per test module (a module may swap its scheduler)."""
    from pipelines import LatentPipeline

    pipe = LatentPipeline.from_pretrained(tiny_run)
    pipe.set_progress_bar_config(disable=True)
    return pipe
