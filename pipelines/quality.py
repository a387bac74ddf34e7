"""What `evaluate` measures with: a classifier trained on the run's own data (the training split, or the
held-out one: `evaluate.classifier_trained_on`), and the measures
built on it (recognition, Frechet distance in its features, diversity, near-copies of training images).
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm, trange

from common.checkpoint import load_tensors, save_tensors
from common.config import AugmentConfig, Config, EvalConfig
from common.data import ImageDataset, augment_batch, image_batches
from common.data.pixels import fitted_arrays, to_tensor
from common.run import RunFolder

CLASSIFIER_FILE = "classifier.safetensors"


class DigitClassifier(nn.Module):
    """A small CNN; its 128-d penultimate layer is the feature space of the Frechet distance."""

    VERSION = 3  # part of the cache key: a changed architecture or training retrains (3: seeded before its init)

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
    """Train the evaluator on the split `evaluate.classifier_trained_on` names, or load it from run/evaluator/.
    Returns it and its accuracy on the other split (the ceiling of recognition).

    It always trains with small random shifts, rotations and zooms, whatever the dataset's own augmentation.
    """
    cfg: EvalConfig = config.evaluate
    learn, other = reader_splits(cfg, train_set, holdout_set)
    folder = RunFolder(config.run_dir).root / "evaluator"
    torch.manual_seed(cfg.classifier_seed)  # before the model: its initial weights must not depend on what ran before
    model = DigitClassifier(config.data.channels, len(train_set.classes)).to(device)
    key = {"dataset": train_set.fingerprint(), "steps": cfg.classifier_steps, "batch": cfg.classifier_batch_size,
           "seed": cfg.classifier_seed, "classes": len(train_set.classes), "version": DigitClassifier.VERSION}
    if cfg.classifier_trained_on != "train":  # keys of classifiers cached before the choice existed stay valid
        key["trained_on"] = cfg.classifier_trained_on
    if cfg.classifier_print_fonts:  # the renders themselves key it: other fonts, counts or jitter retrain
        printed, printed_labels = print_font_images(learn)
        key["print_fonts"] = hashlib.sha256(printed.numpy().tobytes() + printed_labels.numpy().tobytes()).hexdigest()[:16]
    if (folder / CLASSIFIER_FILE).is_file():
        try:
            tensors, meta = load_tensors(folder / CLASSIFIER_FILE)
        except Exception as error:  # a damaged cache (a disk error, a cut-short copy) is only trained again
            print(f"[evaluate] ignoring the unreadable cached classifier {folder / CLASSIFIER_FILE} "
                  f"({str(error).splitlines()[0][:120]}); training it again")
            tensors, meta = {}, None
        # a non-finite weight would read every image as one class: recognition silently wrong, so trained again
        if meta and meta.get("key") == key and all(torch.isfinite(t).all() for t in tensors.values()):
            model.load_state_dict(tensors)
            return model.eval(), meta["heldout_accuracy"]
    images, labels = real_images(learn), torch.tensor(learn.labels)
    if cfg.classifier_print_fonts:  # renders of print fonts beside the split: a reader of more than one hand
        images, labels = torch.cat([images, printed]), torch.cat([labels, printed_labels])
    fit_classifier(model, images.to(device), labels.to(device), cfg.classifier_steps, cfg.classifier_batch_size)
    accuracy = recognition_rate(model, real_images(other), torch.tensor(other.labels), shape_groups(train_set.classes), device)
    save_tensors(folder / CLASSIFIER_FILE, model.state_dict(), {"key": key, "heldout_accuracy": accuracy})
    return model, accuracy


def fit_classifier(model: DigitClassifier, images: torch.Tensor, labels: torch.Tensor, steps: int, batch_size: int,
                   desc: str = "evaluator classifier") -> DigitClassifier:
    """Train `model` on `images` (N, C, H, W) in [-1, 1] and `labels` (N,), on their device, with small random
    shifts, rotations and zooms (batches drawn from torch's global generator); returns it in eval mode."""
    shifts = AugmentConfig(rotate_degrees=10, translate=0.1, scale=0.1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    model.train()
    for _ in trange(steps, desc=desc, dynamic_ncols=True, leave=False):
        batch = torch.randint(len(images), (batch_size,), device=images.device)
        logits, _ = model(augment_batch(images[batch], shifts))
        loss = F.cross_entropy(logits, labels[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()


def reader_splits(cfg: EvalConfig, train_set: ImageDataset, holdout_set: ImageDataset) -> tuple[ImageDataset, ImageDataset]:
    """(the split the evaluator learns from, the split its ceiling is measured on), by `classifier_trained_on`."""
    return (holdout_set, train_set) if cfg.classifier_trained_on == "holdout" else (train_set, holdout_set)


def recognition_rate(model: DigitClassifier, images: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor,
                     device: torch.device) -> float:
    """The share of `images` (N, C, H, W) the classifier reads as their label's shape group (`shape_groups`)."""
    return groups[classify(model, images, device)[0]].eq(groups[labels]).float().mean().item()


def print_font_images(dataset: ImageDataset) -> tuple[torch.Tensor, torch.Tensor]:
    """The source's print-font renders (`Listing.print_fonts`), fitted like its images: (N, C, H, W) in [-1, 1], (N,)."""
    pixels, labels = dataset.listing.print_fonts()
    c = dataset.config
    fitted = fitted_arrays(pixels, c.image_size, c.channels, c.fit)  # (N, H, W, C) uint8
    return torch.stack([to_tensor(a) for a in fitted]), torch.as_tensor(labels, dtype=torch.long)


def real_images(dataset: ImageDataset) -> torch.Tensor:
    """Every image of `dataset`, un-augmented: (N, C, H, W) in [-1, 1]."""
    return torch.cat([b["pixel_values"] for b in image_batches(dataset, 256)])


@torch.no_grad()
def classify(model: DigitClassifier, images: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C, H, W) in [-1, 1] -> predicted labels (N,), features (N, 128)."""
    labels, features = [], []  # on the device, copied to the host once
    for start in range(0, len(images), 512):
        logits, feats = model(images[start:start + 512].to(device))
        labels.append(logits.argmax(1))
        features.append(feats)
    return torch.cat(labels).cpu(), torch.cat(features).cpu()


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


def relative_diversity(features: torch.Tensor, labels: torch.Tensor, real_features: torch.Tensor,
                       real_labels: torch.Tensor, num_classes: int) -> dict:
    """Mean pairwise feature distance within each class, summed over classes, relative to real images':
    {"relative", "generated", "heldout"} (the latter two per class on average)."""
    generated = [mean_pairwise_distance(features[labels == k]) for k in range(num_classes)]
    real = [mean_pairwise_distance(real_features[real_labels == k]) for k in range(num_classes)]
    spread = sum(real)  # 0 where every held-out image of each class is the same: no spread to compare with
    return {"relative": sum(generated) / spread if spread > 0 else float("nan"), "generated": sum(generated) / num_classes,
            "heldout": sum(real) / num_classes}


def near_copy_rate(images: torch.Tensor, train_images: torch.Tensor, ratio: float = 1 / 3, neighbours: int = 50) -> float:
    """Share of `images` whose nearest training image is much closer than the next `neighbours` ones.

    An image counts as a near-copy when d(nearest) < ratio * mean d(2nd .. 51st nearest), in pixel
    space: the relative test of Carlini et al. 2023 (Extracting training data from diffusion models).
    """
    flat_train = train_images.flatten(1).float()
    neighbours = min(neighbours, len(flat_train) - 1)  # small datasets: compare with as many as there are
    if neighbours < 1:
        return float("nan")  # one training image: no ratio to test
    copies = torch.zeros((), dtype=torch.long, device=flat_train.device)  # read once at the end
    for start in range(0, len(images), 256):
        d = torch.cdist(images[start:start + 256].flatten(1).float(), flat_train)
        nearest = d.topk(neighbours + 1, largest=False).values  # (n, 51), ascending
        copies += (nearest[:, 0] < ratio * nearest[:, 1:].mean(1)).sum()
    return copies.item() / len(images)


@torch.no_grad()
def generate_for(pipe, prompts: list[str], per_prompt: int, seed: int, steps: int | None = None,
                 guidance: float | None = None, desc: str = "generate",
                 guidance_interval: tuple[float, float] | None = None) -> torch.Tensor:
    """`per_prompt` images for each prompt, in prompt order: (len(prompts) * per_prompt, C, H, W) in [-1, 1].
    `steps`/`guidance`/`guidance_interval`: None samples with the run's own defaults. A progress bar
    (with ETA) named `desc`."""
    images = []
    generator = torch.Generator(pipe.device).manual_seed(seed)
    with tqdm(total=len(prompts) * per_prompt, desc=desc, unit="img", dynamic_ncols=True, leave=False) as progress:
        for start in range(0, len(prompts), 4):  # a few prompts per batch bounds memory
            chunk = prompts[start:start + 4]
            out = pipe(chunk, num_images_per_prompt=per_prompt, num_inference_steps=steps, guidance_scale=guidance,
                       generator=generator, output_type="pt", guidance_interval=guidance_interval).images
            images.append(out.cpu() * 2 - 1)
            progress.update(len(out))
    return torch.cat(images)


def shape_groups(classes: list) -> torch.Tensor:
    """(K,): for each class, the index of the first class with the same `shape` field. Classes a source
    marks as one shape (letters: C/c, O/o, S/s, V/v, W/w, X/x, Z/z, the same once centred and scaled
    like EMNIST) count as one in recognition; every other class is its own."""
    first: dict[str, int] = {}
    return torch.tensor([first.setdefault(c.fields.get("shape", f"class {c.key}"), k) for k, c in enumerate(classes)])


def class_recognition(pipe, classifier: DigitClassifier, prompts: list[str], per_class: int, seed: int,
                      device: torch.device, steps: int | None = None, guidance: float | None = None,
                      desc: str = "recognition", groups: torch.Tensor | None = None,
                      guidance_interval: tuple[float, float] | None = None) -> dict:
    """Generate `per_class` images for each class prompt (prompt k draws class k) and classify them;
    a prediction is right when it is in the class's shape group (`shape_groups`; default: the class)."""
    generated = generate_for(pipe, prompts, per_class, seed, steps, guidance, desc, guidance_interval)
    labels = torch.arange(len(prompts)).repeat_interleave(per_class)
    predicted, features = classify(classifier, generated, device)
    groups = torch.arange(len(prompts)) if groups is None else groups
    correct = groups[predicted].eq(groups[labels])
    return {"images": generated, "labels": labels, "features": features, "accuracy": correct.float().mean().item(),
            "per_class": [correct[labels == k].float().mean().item() for k in range(len(prompts))]}


