"""evaluate: quality metrics of a run, printed as one JSON object and written to `run/eval.json`.

    evaluate --config configs/mnist.yaml

- VAE: held-out PSNR and SSIM.
- Recognition accuracy: a small CNN, trained here on the training split only (cached in
  `run/evaluator/`), classifies images generated for each class prompt; per class and overall, with
  the classifier's own held-out accuracy as the ceiling.
- Frechet distance in that classifier's feature space between generated and held-out images, beside
  the same distance between real training and held-out images (the floor).
- Paraphrase accuracy: the same on prompts that are not training templates ("Sketch the number 4").
- Diversity: mean pairwise feature distance within each class, relative to held-out real images.
- Memorization: the share of generated images that are near-copies of one training image
  (nearest-neighbour ratio test of Carlini et al. 2023), beside the same share for held-out images.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.checkpoint import load_tensors, save_tensors, writable_folder, write_json
from common.cli import run_cli
from common.config import AugmentConfig, Config, EvalConfig, dump_config
from common.data import ImageDataset, augment_batch, class_prompt, image_batches, load_train_and_holdout
from common.errors import UserError
from common.run import RunFolder
from pipelines.generate import load_pipeline
from vae.reconstruct import reconstruction_metrics

CLASSIFIER_FILE = "classifier.safetensors"


class DigitClassifier(nn.Module):
    """A small CNN; its 128-d penultimate layer is the feature space of the Frechet distance."""

    VERSION = 2  # part of the cache key: a changed architecture retrains

    def __init__(self, channels: int, num_classes: int, width: int = 32):
        super().__init__()

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]

        self.features = nn.Sequential(
            *block(channels, width), nn.MaxPool2d(2),  # (N, 32, H/2, W/2)
            *block(width, 2 * width), nn.MaxPool2d(2),  # (N, 64, H/4, W/4)
            *block(2 * width, 4 * width), nn.MaxPool2d(2),  # (N, 128, H/8, W/8)
            *block(4 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),  # (N, 128)
        )
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # -> logits (N, K), features (N, 128)
        features = self.features(images)
        return self.head(features), features


def train_classifier(config: Config, train_set: ImageDataset, holdout_set: ImageDataset, device: torch.device) -> tuple[DigitClassifier, float]:
    """Train the evaluator on the training split, or load it from run/evaluator/.

    It always trains with small random shifts, rotations and zooms, whatever the dataset's own augmentation.
    """
    cfg: EvalConfig = config.evaluate
    folder = RunFolder(config.run_dir).root / "evaluator"
    model = DigitClassifier(config.data.channels, len(train_set.classes)).to(device)
    key = {"dataset": train_set.fingerprint(), "steps": cfg.classifier_steps, "batch": cfg.classifier_batch_size,
           "seed": config.seed, "classes": len(train_set.classes), "version": DigitClassifier.VERSION}
    if (folder / CLASSIFIER_FILE).is_file():
        tensors, meta = load_tensors(folder / CLASSIFIER_FILE)
        if meta and meta.get("key") == key:
            model.load_state_dict(tensors)
            return model.eval(), meta["heldout_accuracy"]
    torch.manual_seed(config.seed)
    images, labels = real_images(train_set).to(device), torch.tensor(train_set.labels, device=device)
    shifts = AugmentConfig(rotate_degrees=10, translate=0.1, scale=0.1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=cfg.classifier_steps)
    model.train()
    for _ in range(cfg.classifier_steps):
        batch = torch.randint(len(images), (cfg.classifier_batch_size,), device=device)
        logits, _ = model(augment_batch(images[batch], shifts))
        loss = F.cross_entropy(logits, labels[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    accuracy = classify(model, real_images(holdout_set), device)[0].eq(torch.tensor(holdout_set.labels)).float().mean().item()
    save_tensors(folder / CLASSIFIER_FILE, model.state_dict(), {"key": key, "heldout_accuracy": accuracy})
    return model, accuracy


def real_images(dataset: ImageDataset) -> torch.Tensor:
    """Every image of `dataset`, un-augmented: (N, C, H, W) in [-1, 1]."""
    return torch.cat([b["pixel_values"] for b in image_batches(dataset, 256)])


@torch.no_grad()
def classify(model: DigitClassifier, images: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C, H, W) in [-1, 1] -> predicted labels (N,), features (N, 128)."""
    labels, features = [], []
    for start in range(0, len(images), 512):
        logits, feats = model(images[start:start + 512].to(device))
        labels.append(logits.argmax(1).cpu())
        features.append(feats.cpu())
    return torch.cat(labels), torch.cat(features)


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between two feature sets (Heusel et al. 2017)."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    # Tr((S_a S_b)^(1/2)) = sum of the square roots of the eigenvalues of S_a S_b (real, >= 0 up to round-off)
    sqrt_trace = torch.linalg.eigvals(cov_a @ cov_b).real.clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * sqrt_trace)


def mean_pairwise_distance(features: torch.Tensor) -> float:
    n = len(features)
    if n < 2:
        return float("nan")
    return float(torch.cdist(features, features).sum() / (n * (n - 1)))


def near_copy_rate(images: torch.Tensor, train_images: torch.Tensor, ratio: float = 1 / 3, neighbours: int = 50) -> float:
    """Share of `images` whose nearest training image is much closer than the next `neighbours` ones.

    An image counts as a near-copy when d(nearest) < ratio * mean d(2nd .. 51st nearest), in pixel
    space: the relative test of Carlini et al. 2023 (Extracting training data from diffusion models).
    """
    flat_train = train_images.flatten(1).float()
    neighbours = min(neighbours, len(flat_train) - 1)  # small datasets: compare with as many as there are
    if neighbours < 1:
        return float("nan")  # one training image: no ratio to test
    copies = 0
    for start in range(0, len(images), 256):
        d = torch.cdist(images[start:start + 256].flatten(1).float(), flat_train)
        nearest = d.topk(neighbours + 1, largest=False).values  # (n, 51), ascending
        copies += (nearest[:, 0] < ratio * nearest[:, 1:].mean(1)).sum().item()
    return copies / len(images)


@torch.no_grad()
def generate_for(pipe, prompts: list[str], per_prompt: int, config: Config, seed: int) -> torch.Tensor:
    """`per_prompt` images for each prompt, in prompt order: (len(prompts) * per_prompt, C, H, W) in [-1, 1]."""
    images = []
    generator = torch.Generator(pipe.device).manual_seed(seed)
    for start in range(0, len(prompts), 4):  # a few prompts per batch bounds memory
        chunk = prompts[start:start + 4]
        out = pipe(chunk, num_images_per_prompt=per_prompt, num_inference_steps=config.sample.num_inference_steps,
                   guidance_scale=config.sample.guidance_scale, generator=generator, output_type="pt").images
        images.append(out.cpu() * 2 - 1)
    return torch.cat(images)


def main(config: Config, args: argparse.Namespace | None = None) -> dict:
    started = time.time()
    cfg = config.evaluate
    run = RunFolder(config.run_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(dump_config(config))
    train_set, holdout_set = load_train_and_holdout(config.data)
    if not train_set.classes:
        raise UserError("evaluate measures class datasets (recognition, paraphrases); this dataset has free captions only")
    results: dict = {"run": str(run.root), "sampler": None, "num_inference_steps": config.sample.num_inference_steps,
                     "guidance_scale": config.sample.guidance_scale}

    pipe = load_pipeline(writable_folder(run.root, "run_dir"), device)  # a run with no model yet: a clear error
    vae_metrics = reconstruction_metrics(pipe.vae.float(), holdout_set, len(holdout_set))
    results["vae"] = {"heldout_psnr": vae_metrics["psnr"], "heldout_ssim": vae_metrics["ssim"]}

    classifier, ceiling = train_classifier(config, train_set, holdout_set, device)
    pipe.set_progress_bar_config(disable=True)
    results["sampler"] = type(pipe.scheduler).__name__
    names = [c.fields.get("name", c.key) for c in train_set.classes]
    prompts = train_set.class_prompts()
    labels = torch.arange(len(prompts)).repeat_interleave(cfg.images_per_class)
    generated = generate_for(pipe, prompts, cfg.images_per_class, config, config.seed)
    predicted, gen_features = classify(classifier, generated, device)
    correct = predicted.eq(labels)
    per_class = {name: correct[labels == k].float().mean().item() for k, name in enumerate(names)}
    results["recognition"] = {"accuracy": correct.float().mean().item(), "per_class": per_class,
                              "min_class": min(per_class.values()), "classifier_heldout_accuracy": ceiling,
                              "prompts": prompts, "images_per_class": cfg.images_per_class}

    holdout = real_images(holdout_set)
    train_images = real_images(train_set)
    _, holdout_features = classify(classifier, holdout, device)
    reference = train_images[torch.randperm(len(train_images), generator=torch.Generator().manual_seed(0))[:len(generated)]]
    _, reference_features = classify(classifier, reference, device)
    fd = frechet_distance(gen_features, holdout_features)
    floor = frechet_distance(reference_features, holdout_features)
    results["frechet"] = {"generated_vs_heldout": fd, "train_vs_heldout_floor": floor, "ratio": fd / max(floor, 1e-12)}

    holdout_labels = torch.tensor(holdout_set.labels)
    gen_spread = [mean_pairwise_distance(gen_features[labels == k]) for k in range(len(names))]
    real_spread = [mean_pairwise_distance(holdout_features[holdout_labels == k]) for k in range(len(names))]
    results["diversity"] = {"relative": sum(gen_spread) / sum(real_spread), "generated": sum(gen_spread) / len(names),
                            "heldout": sum(real_spread) / len(names)}
    results["memorization"] = {"rate": near_copy_rate(generated, train_images),
                               "heldout_rate": near_copy_rate(holdout, train_images)}

    if cfg.paraphrases:
        items = [(template, k, prompt) for template in cfg.paraphrases for k, c in enumerate(train_set.classes)
                 if (prompt := class_prompt(c.fields, [template])) is not None]
        per_prompt = max(1, cfg.images_per_class // len(cfg.paraphrases))
        para_images = generate_for(pipe, [prompt for _, _, prompt in items], per_prompt, config, config.seed + 1)
        para_predicted = classify(classifier, para_images, device)[0].view(len(items), per_prompt)
        para_correct = para_predicted.eq(torch.tensor([k for _, k, _ in items])[:, None]).float()
        by_template = {t: para_correct[[i for i, item in enumerate(items) if item[0] == t]].mean().item()
                       for t in cfg.paraphrases}
        results["paraphrase"] = {"accuracy": para_correct.mean().item(), "per_template": by_template,
                                 "images_per_prompt": per_prompt}

    results["evaluation_seconds"] = time.time() - started
    print(write_json(run.root / "eval.json", results))
    return results


def cli(argv: list[str] | None = None) -> None:
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--run", help="a run folder (default: the config's run_dir)")

    run_cli(__doc__.splitlines()[0], main, argv, add_arguments=add_arguments, config_required=False)


if __name__ == "__main__":
    cli()
