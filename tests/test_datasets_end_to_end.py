"""The other dataset layouts through the whole chain: flowers (RGB class_index.jpg) and metadata.jsonl."""

import argparse
import json
import re
import shutil

import numpy as np
import pytest
import torch

from common.checkpoint import DamagedFileError
from common.config_yaml import load_config
from common.errors import UserError
from conftest import ROOT, tiny_config
from ldm.encode import main as encode_main
from ldm.train import main as ldm_main
from ldm.train_clip import main as clip_main
from pipelines import LatentPipeline
from pipelines.caption_quality import clip_score
from pipelines.evaluate import main as evaluate_main
from vae.train import main as vae_main

FEW_STEPS = [f"{stage}.{key}={value}" for stage in ("vae", "clip", "ldm")
             for key, value in [("max_steps", 2), ("batch_size", 4), ("warmup_steps", 1), ("save_every", 2), ("sample_every", 2)]]


def run_chain(config) -> LatentPipeline:
    for stage in (clip_main, vae_main, encode_main, ldm_main):
        stage(config)
    pipe = LatentPipeline.from_pretrained(config.run_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_flowers_config_on_a_folder_of_coloured_shapes(flowers_folder, tmp_path):
    config = load_config(ROOT / "configs" / "flowers.yaml", [
        f"data.path={flowers_folder}", f"run_dir={tmp_path / 'run'}", "data.holdout_fraction=0.2",
        "vae.disc_start=1", "vae.scale_images=8", "vae.eval_images=4", "sample.num_inference_steps=2", *FEW_STEPS])
    pipe = run_chain(config)
    assert pipe.vae.config.in_channels == 3 and pipe.unet.config.sample_size == 16  # 64x64x3 -> 16x16x4
    for prompt in ["Orchids", "Draw a tulips"]:
        image = pipe(prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
        assert image.mode == "RGB" and image.size == (64, 64)
    assert [c["fields"]["name"] for c in pipe.classes] == ["orchids", "tulips"]


def test_metadata_jsonl_with_free_captions_end_to_end(jsonl_folder, tmp_path):
    config = tiny_config(tmp_path / "run", "data.name=", f"data.path={jsonl_folder}", "data.channels=3", "data.max_per_class=0",
                         "data.holdout_fraction=0.2", "data.augment.rotate_degrees=0")
    pipe = run_chain(config)
    images = pipe(["a bright circle number 0", "a bright triangle"], num_inference_steps=2, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all()
    assert pipe.classes == []  # free captions: no class table, and write() says so

    # evaluate: a CLIP score and a CLIP-space Frechet distance instead of class recognition
    config = tiny_config(tmp_path / "run", "data.name=", f"data.path={jsonl_folder}", "data.channels=3", "data.max_per_class=0",
                         "data.holdout_fraction=0.2", "evaluate.caption_images=2")
    results = evaluate_main(config)
    saved = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert saved["clip_score"]["captions"] == 2 and saved["num_inference_steps"] == 2
    assert {k: round(v, 6) for k, v in saved["clip_score"].items()} == {k: round(v, 6) for k, v in results["clip_score"].items()}
    assert 0 <= saved["clip_score"]["generated"] <= 100 and saved["frechet_clip"]["train_vs_heldout_floor"] >= 0
    assert "recognition" not in saved and saved["guidance_interval"] == [0.0, 1.0]

    # --guidance-interval is used and recorded (before: ignored for caption datasets, and eval.json did not say)
    flags = lambda interval: argparse.Namespace(steps=None, guidance=4.0, guidance_interval=interval)  # noqa: E731
    everywhere, late = (evaluate_main(config, flags(interval)) for interval in (None, [0.5, 1.0]))
    assert late["guidance_interval"] == [0.5, 1.0] and late["clip_score"]["generated"] != everywhere["clip_score"]["generated"]

    # a damaged clip/ is named with the command that writes it again (before: transformers' bare error)
    weights = tmp_path / "run" / "clip" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(DamagedFileError, match=re.escape(f"{weights} is damaged (") + r"\d+ bytes where its header describes \d+: cut short"):
        evaluate_main(config)

    # a run without the whole CLIP (trained before train-clip saved it) gets a clear error
    shutil.rmtree(tmp_path / "run" / "clip")
    with pytest.raises(UserError, match=r"evaluating a caption dataset needs the run's whole CLIP in .*/run/clip "
                                        r"\(both towers\), which train-clip writes"):
        evaluate_main(tiny_config(tmp_path / "run", "data.name=", f"data.path={jsonl_folder}", "data.channels=3",
                                  "data.max_per_class=0", "data.holdout_fraction=0.2"))


def test_clip_score_is_100_times_the_clamped_mean_cosine():
    images = torch.tensor([[1.0, 0.0], [0.6, 0.8], [1.0, 0.0]])
    texts = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]])  # cosines 1, 0.6, -1 (clamped to 0)
    assert clip_score(images, texts) == pytest.approx(100 * (1 + 0.6 + 0) / 3, abs=1e-5)
