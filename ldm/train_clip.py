"""train-clip: a small CLIP trained on the dataset's image-caption pairs, for machines without a pretrained one.

    train-clip --config configs/mnist.yaml

Trains a byte-level BPE tokenizer on the captions, then transformers' `CLIPModel` (a text
transformer and a ViT sized for the images) with CLIP's contrastive loss (Radford et al. 2021).
Captions of the same class are all positives of each other, so a batch with several "Draw a six"
images does not push identical texts apart. Writes `run/text_encoder/` (CLIPTextModel) and
`run/tokenizer/` in the format of a pretrained CLIP, and reports zero-shot accuracy on the held-out
split (each image against every class's prompts).
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPModel, CLIPTextModel

from common.checkpoint import atomic_directory, write_json
from common.cli import run_cli
from common.config import ClipConfig, Config
from common.data import ImageDataset, StepBatches, augment_batch, image_batches, load_train_and_holdout, steps_for
from common.training import Trainer
from ldm.text import caption_variants, tokenize, train_tokenizer


def build_clip(cfg: ClipConfig, vocab_size: int, channels: int, image_size: int) -> CLIPModel:
    text = dict(vocab_size=vocab_size, hidden_size=cfg.text_hidden, intermediate_size=4 * cfg.text_hidden,
                num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
                max_position_embeddings=cfg.max_length, bos_token_id=0, eos_token_id=1, pad_token_id=1,
                projection_dim=cfg.projection_dim)
    vision = dict(hidden_size=cfg.vision_hidden, intermediate_size=4 * cfg.vision_hidden,
                  num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads,
                  num_channels=channels, image_size=image_size, patch_size=cfg.patch_size,
                  projection_dim=cfg.projection_dim)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=cfg.projection_dim))


def contrastive_loss(logits_per_image: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Symmetric cross-entropy against every positive pair, not only the diagonal. (B, B) -> ()."""
    targets = positives.float()
    image_loss = -(targets / targets.sum(1, keepdim=True) * F.log_softmax(logits_per_image, 1)).sum(1).mean()
    text_loss = -(targets.T / targets.T.sum(1, keepdim=True) * F.log_softmax(logits_per_image.T, 1)).sum(1).mean()
    return 0.5 * (image_loss + text_loss)


@torch.no_grad()
def zero_shot_accuracy(model: CLIPModel, tokenizer, dataset: ImageDataset, batch_size: int = 256) -> float:
    """Held-out images classified by their nearest class text (mean embedding over the class's captions)."""
    classes = sorted(set(dataset.labels))
    if not dataset.classes or len(classes) < 2:
        return float("nan")
    device = model.device
    class_embeddings = []
    for label in classes:
        ids = dataset.caption_ids[dataset.labels.index(label)]
        inputs = tokenize(tokenizer, [dataset.captions[i] for i in ids]).input_ids.to(device)
        embedding = F.normalize(model.get_text_features(input_ids=inputs).pooler_output, dim=-1).mean(0)
        class_embeddings.append(F.normalize(embedding, dim=-1))
    text = torch.stack(class_embeddings)  # (K, D)
    correct = 0
    for batch in image_batches(dataset, batch_size):
        image = F.normalize(model.get_image_features(pixel_values=batch["pixel_values"].to(device)).pooler_output, dim=-1)
        predicted = torch.tensor(classes, device=device)[(image @ text.T).argmax(1)]
        correct += (predicted == batch["label"].to(device)).sum().item()
    return correct / len(dataset)


def main(config: Config, args: argparse.Namespace | None = None) -> dict:
    cfg = config.clip
    with Trainer("clip", config, cfg) as trainer:
        run, device = trainer.run, trainer.device

        train_set, holdout_set = load_train_and_holdout(config.data)
        trainer.record_inputs(dataset=train_set.fingerprint())
        tokenizer = train_tokenizer(train_set.captions, cfg.vocab_size, cfg.max_length)
        trainer.print(f"[clip] {len(train_set)} images, {len(train_set.captions)} distinct captions, "
                      f"vocabulary {len(tokenizer)} tokens")
        # every caption and its perturbed variants, tokenized once: (K, V + 1, L)
        variants = caption_variants(tokenizer, train_set.captions, cfg.caption_variants, config.seed)
        caption_ids = tokenize(tokenizer, [v for group in variants for v in group]).input_ids
        caption_ids = caption_ids.view(len(variants), cfg.caption_variants + 1, -1).to(device)
        captions_per_image = [torch.tensor(ids) for ids in train_set.caption_ids]
        labels = torch.tensor(train_set.labels)

        model = trainer.add("clip", build_clip(cfg, len(tokenizer), config.data.channels, config.data.image_size))
        trainer.describe_batch()
        total_steps = steps_for(cfg.max_steps, cfg.epochs, len(train_set), trainer.global_batch)
        start = trainer.resume()
        sampler = StepBatches(len(train_set), cfg.batch_size, config.seed, start, trainer.rank, trainer.world_size,
                              cfg.grad_accum)
        batches = iter(torch.utils.data.DataLoader(train_set, batch_sampler=sampler, num_workers=config.data.num_workers,
                                                   persistent_workers=config.data.num_workers > 0))

        with trainer.running(total_steps):
            for step in range(start, total_steps):
                trainer.set_learning_rate(step)
                trainer.reseed(step)
                for micro in range(cfg.grad_accum):
                    batch = next(batches)
                    index = batch["index"]
                    # one of each image's captions, drawn from the step's seeded generator
                    chosen = torch.stack([ids[torch.randint(len(ids), ())] for ids in (captions_per_image[i] for i in index)])
                    if train_set.classes:  # same class = positive pair
                        positives = labels[index][:, None] == labels[index][None, :]
                    else:  # free captions: identical text = positive pair
                        positives = chosen[:, None] == chosen[None, :]
                    images = batch["pixel_values"].to(device)
                    if cfg.augment:
                        images = augment_batch(images, config.data.augment)
                    variant = torch.randint(cfg.caption_variants + 1, (len(chosen),))
                    with trainer.no_sync("clip", micro):
                        out = model(input_ids=caption_ids[chosen.to(device), variant.to(device)], pixel_values=images)
                        loss = contrastive_loss(out.logits_per_image, positives.to(device))
                        trainer.backward(loss / cfg.grad_accum)
                trainer.check_finite(trainer.optimizer_step("clip"), step)
                trainer.update_ema(step)
                trainer.log(step, loss=loss.detach(), scale=trainer.unwrap("clip").logit_scale.exp().detach())
                trainer.save_if_due(step)
        trainer.save_final()

        results = {}
        if trainer.is_main:
            clip = trainer.inference_model("clip").eval()
            accuracy = zero_shot_accuracy(clip, tokenizer, holdout_set)
            text_encoder = CLIPTextModel(clip.config.text_config)
            text_encoder.load_state_dict(clip.text_model.state_dict())
            with atomic_directory(run.component("text_encoder")) as folder:
                text_encoder.save_pretrained(folder, safe_serialization=True)
            with atomic_directory(run.component("tokenizer")) as folder:
                tokenizer.save_pretrained(folder)
            results = {"step": trainer.step, "zero_shot_accuracy": accuracy, "heldout_images": len(holdout_set),
                       "vocab_size": len(tokenizer)}
            trainer.write_log({"event": "final", **results})
            write_json(run.root / "clip_metrics.json", results)
            trainer.print(f"[clip] zero-shot accuracy on {len(holdout_set)} held-out images: {accuracy:.2%}")
            trainer.print(f"[clip] saved {run.component('text_encoder')} and {run.component('tokenizer')}")
        trainer.accelerator.wait_for_everyone()
        return results


def cli(argv: list[str] | None = None) -> None:
    run_cli(__doc__, main, argv)


if __name__ == "__main__":
    cli()
