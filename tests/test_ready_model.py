"""The ready-made MNIST model committed in checkpoints/mnist works right after install."""

import torch

from common.checkpoint import load_tensors
from conftest import ROOT
from pipelines import LatentPipeline
from pipelines.quality import CLASSIFIER_FILE, DigitClassifier, classify

READY = ROOT / "checkpoints" / "mnist"
INFERENCE_PARTS = ["model_index.json", "vae", "text_encoder", "tokenizer", "unet", "scheduler",
                   "evaluator"]


def test_ready_made_model_is_small_and_complete():
    for part in INFERENCE_PARTS:
        assert (READY / part).exists(), part
    size = sum(f.stat().st_size for part in INFERENCE_PARTS for f in [READY / part, *(READY / part).rglob("*")]
               if f.is_file())
    assert size <= 25 * 2**20, f"{size / 2**20:.1f} MB"


def test_ready_made_model_draws_sixes_the_evaluator_reads_as_sixes():
    pipe = LatentPipeline.from_pretrained(READY)
    pipe.set_progress_bar_config(disable=True)
    images = pipe("Draw a six", num_images_per_prompt=16, num_inference_steps=20,
                  generator=torch.Generator().manual_seed(0), output_type="pt").images * 2 - 1
    assert images.shape == (16, 1, 32, 32)
    classifier = DigitClassifier(1, 10)
    classifier.load_state_dict(load_tensors(READY / "evaluator" / CLASSIFIER_FILE)[0])
    predicted, _ = classify(classifier.eval(), images, torch.device("cpu"))
    assert (predicted == 6).float().mean() >= 0.9, predicted.tolist()
    assert pipe("Draw a six").images[0].size == (32, 32)
