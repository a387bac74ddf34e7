"""`evaluate` for datasets with free captions (metadata.jsonl): relative measures in the run's own CLIP space.

- CLIP score (Hessel et al. 2021, scaled as torchmetrics does: 100 * max(cos, 0)) of each image
  generated from a held-out caption against that caption; beside it the same score of the real
  held-out images with their own captions (what a perfect generator would reach) and with each
  other's captions (chance).
- Frechet distance in the CLIP image-embedding space between generated and held-out images, beside
  the same distance between as many real training images and the held-out ones (the floor).

Both use the small CLIP that `train-clip` trained on this dataset (`run/clip/`), so they compare
runs of one dataset with each other; they are not comparable across datasets, nor with published
CLIP scores or FIDs, which use a large pretrained CLIP / Inception network.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import CLIPModel

from common.checkpoint import check_weights
from common.config import Config
from common.data import ImageDataset
from common.errors import UserError
from common.run import RunFolder
from ldm.text import tokenize
from pipelines.quality import frechet_distance, generate_for, real_images


def load_clip(run: RunFolder) -> CLIPModel:
    """Both towers of the run's CLIP, as `train-clip` saved them."""
    folder = run.component("clip")
    if not (folder / "config.json").is_file():
        raise UserError(f"evaluating a caption dataset needs the run's whole CLIP in {folder} (both towers), which "
                        f"train-clip writes; this run has none (trained before it was saved, or with "
                        f"text_encoder.pretrained). Re-run train-clip --run {run.root} to add it")
    check_weights(folder, "train-clip")  # a damaged or non-finite file named, not a bare error or NaN scores
    return CLIPModel.from_pretrained(str(folder), local_files_only=True, use_safetensors=True).eval()


@torch.no_grad()
def embed(clip: CLIPModel, tokenizer, images: torch.Tensor | None = None, texts: list[str] | None = None,
          batch_size: int = 256) -> torch.Tensor:
    """Unit-length CLIP embeddings of (N, C, H, W) images in [-1, 1], or of N texts: (N, projection_dim)."""
    device, out = clip.device, []
    for start in range(0, len(images) if images is not None else len(texts), batch_size):
        if images is not None:
            features = clip.get_image_features(pixel_values=images[start:start + batch_size].to(device))
        else:
            ids = tokenize(tokenizer, texts[start:start + batch_size]).input_ids.to(device)
            features = clip.get_text_features(input_ids=ids)
        features = getattr(features, "pooler_output", features)  # a model output in newer transformers
        out.append(F.normalize(features.float(), dim=-1).cpu())
    return torch.cat(out)


def clip_score(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> float:
    """100 * mean over pairs of max(cos(image_i, text_i), 0)."""
    return float(100 * (image_embeddings * text_embeddings).sum(1).clamp_min(0).mean())


def caption_quality(pipe, config: Config, train_set: ImageDataset, holdout_set: ImageDataset, steps: int,
                    guidance: float, guidance_interval: tuple[float, float] | None = None) -> dict:
    """Generate one image per held-out caption (up to `evaluate.caption_images`) and score them."""
    clip = load_clip(RunFolder(config.run_dir)).to(pipe.device)
    count = min(len(holdout_set), config.evaluate.caption_images)
    chosen = torch.randperm(len(holdout_set), generator=torch.Generator().manual_seed(config.seed))[:count].tolist()
    captions = [holdout_set.captions[holdout_set.caption_ids[i][0]] for i in chosen]  # each image's first caption
    holdout = real_images(holdout_set)[chosen]
    generated = generate_for(pipe, captions, 1, config.seed, steps, guidance, desc="captions",
                             guidance_interval=guidance_interval)
    text = embed(clip, pipe.tokenizer, texts=captions)
    generated_embeddings, holdout_embeddings = embed(clip, pipe.tokenizer, generated), embed(clip, pipe.tokenizer, holdout)
    train = real_images(train_set)
    reference = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(config.seed + 1))[:count]]
    fd = frechet_distance(generated_embeddings, holdout_embeddings)
    floor = frechet_distance(embed(clip, pipe.tokenizer, reference), holdout_embeddings)
    return {
        "clip_score": {"generated": clip_score(generated_embeddings, text),
                       "real_heldout": clip_score(holdout_embeddings, text),
                       "real_shuffled_captions": clip_score(holdout_embeddings, text.roll(1, 0)),
                       "captions": count},
        "frechet_clip": {"generated_vs_heldout": fd, "train_vs_heldout_floor": floor, "ratio": fd / max(floor, 1e-12)},
        "note": "relative measures in this run's own CLIP space: compare runs of one dataset, not datasets",
    }
