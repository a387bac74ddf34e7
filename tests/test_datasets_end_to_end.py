"""The other dataset layouts through the whole chain: flowers (RGB class_index.jpg) and metadata.jsonl."""

import numpy as np
import torch

from common.config_yaml import load_config
from conftest import ROOT, tiny_config
from ldm.encode import main as encode_main
from ldm.train import main as ldm_main
from ldm.train_clip import main as clip_main
from pipelines import LatentPipeline
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
