"""train-clip: a small CLIP trained on the dataset's image-caption pairs, for machines without a pretrained one.

    train-clip --config configs/mnist.yaml

Trains a byte-level BPE tokenizer on the captions, then transformers' `CLIPModel` (a text
transformer and a ViT sized for the images) with CLIP's contrastive loss (Radford et al. 2021).
Captions of the same class are all positives of each other, so a batch with several "Draw a six"
images does not push identical texts apart. The empty prompt joins every batch as a text that matches
no image: it is the unconditional prompt of classifier-free guidance, and without it nothing stops
the contrastive loss from parking one class at the empty prompt's features (seen: "Draw a eight"
read like "" to the UNet, so guidance could not draw eights); `clip.empty_prompt_negative: false`
leaves it out (letters: zero-shot 9.5% with it, 19.9% without, and a UNet that follows its prompts).
Writes `run/text_encoder/` (CLIPTextModel) and `run/tokenizer/` in the format of a pretrained CLIP,
the whole model (both towers, which `evaluate` scores captioned datasets with) in `run/clip/`, and
reports zero-shot accuracy on the held-out split (each image against every class's prompts).
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPModel, CLIPTextModel, CLIPTokenizer

from common.checkpoint import atomic_directory, check_weights, write_json
from common.cli import run_cli
from common.config import ClipConfig, Config
from common.errors import UserError
from common.pretrained import adopt_architecture, init_source
from common.data import (ImageDataset, StepBatches, TrainingImages, augment_batch, image_batches, load_train_and_holdout,
                         steps_for)
from common.data.captions import CaptionDraw
from common.training import Trainer
from ldm.text import caption_variants, check_classes_read_apart, prompt_separation, tokenize, train_tokenizer


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


def initial_clip(config: Config, captions: list[str]) -> tuple[CLIPModel, CLIPTokenizer, str]:
    """The CLIP and tokenizer a run starts from: `clip.init_from`'s (a run's `clip/` and `tokenizer/`, or a
    transformers CLIPModel folder with its tokenizer; the architecture replaces the config's), or a new
    model with a tokenizer learned from `captions`. Returns them and a line for the log."""
    cfg, data = config.clip, config.data
    if not cfg.init_from:
        tokenizer = train_tokenizer(captions, cfg.vocab_size, cfg.max_length)
        return build_clip(cfg, len(tokenizer), data.channels, data.image_size), tokenizer, "new weights"
    folder = init_source(cfg.init_from, "clip", "clip.init_from", ("CLIPModel", "clip"),
                         hint=f". To keep a run's text encoder as it is instead, skip train-clip and set "
                              f"text_encoder.pretrained={cfg.init_from}")
    tokenizer_folder = folder.parent / "tokenizer" if (folder.parent / "tokenizer").is_dir() else folder
    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_folder), local_files_only=True)
    except (OSError, ValueError, TypeError):
        raise UserError(f"clip.init_from: no CLIP tokenizer in {tokenizer_folder}; the text tower needs the token "
                        f"ids it was trained with") from None
    check_weights(folder, "train-clip")  # a cut-short file named with what is wrong, not a bare OSError
    model = CLIPModel.from_pretrained(folder, use_safetensors=True, local_files_only=True)
    vision, text = model.config.vision_config, model.config.text_config
    if vision.num_channels != data.channels or vision.image_size != data.image_size:
        raise UserError(f"clip.init_from: the CLIP in {folder} sees {vision.image_size}x{vision.image_size}x"
                        f"{vision.num_channels} images, but this run's are {data.image_size}x{data.image_size}x"
                        f"{data.channels} (data.image_size, data.channels); its position embeddings fit one size only")
    note = adopt_architecture(cfg, {
        "vocab_size": text.vocab_size, "max_length": text.max_position_embeddings, "text_hidden": text.hidden_size,
        "text_layers": text.num_hidden_layers, "text_heads": text.num_attention_heads, "vision_hidden": vision.hidden_size,
        "vision_layers": vision.num_hidden_layers, "vision_heads": vision.num_attention_heads,
        "patch_size": vision.patch_size, "projection_dim": model.config.projection_dim}, "clip")
    return model, tokenizer, f"weights and tokenizer from {folder} ({note})"


def contrastive_loss(logits_per_image: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Symmetric cross-entropy against every positive pair, not only the diagonal. (B, T) -> ().

    Texts beyond the B images' own (T > B) are negatives only: they enter each image's softmax, and,
    having no positive, no text-side term.
    """
    targets = positives.float()
    image_loss = -(targets / targets.sum(1, keepdim=True) * F.log_softmax(logits_per_image, 1)).sum(1).mean()
    batch = logits_per_image.shape[0]
    targets_t, logits_t = targets.T[:batch], logits_per_image.T[:batch]
    text_loss = -(targets_t / targets_t.sum(1, keepdim=True) * F.log_softmax(logits_t, 1)).sum(1).mean()
    return 0.5 * (image_loss + text_loss)


def zero_shot_unmeasurable(dataset: ImageDataset) -> str | None:
    """Why zero-shot accuracy cannot be measured on `dataset` (no classes, or one), or None if it can."""
    if not dataset.classes:
        return "a caption dataset has no classes to choose between"
    if len(set(dataset.labels)) < 2:
        return (f"its {len(dataset)} image(s) are all of one class ('{dataset.classes[dataset.labels[0]].key}'), so there "
                f"is nothing to choose between")
    return None


@torch.no_grad()
def zero_shot_accuracy(model: CLIPModel, tokenizer, dataset: ImageDataset, batch_size: int = 256) -> float:
    """Held-out images classified by their nearest class text (mean embedding over the class's captions);
    NaN (null in JSON) when `zero_shot_unmeasurable` says why not."""
    if zero_shot_unmeasurable(dataset):
        return float("nan")
    classes = sorted(set(dataset.labels))
    device = model.device
    class_embeddings = []
    for label in classes:
        ids = dataset.caption_ids[dataset.labels.index(label)]
        inputs = tokenize(tokenizer, [dataset.captions[i] for i in ids]).input_ids.to(device)
        embedding = F.normalize(model.get_text_features(input_ids=inputs).pooler_output, dim=-1).mean(0)
        class_embeddings.append(F.normalize(embedding, dim=-1))
    text = torch.stack(class_embeddings)  # (K, D)
    class_labels = torch.tensor(classes, device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)  # read once at the end, not per batch
    for batch in image_batches(dataset, batch_size, device=device):
        image = F.normalize(model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output, dim=-1)
        correct += (class_labels[(image @ text.T).argmax(1)] == batch["label"]).sum()
    return correct.item() / len(dataset)


def main(config: Config, args: argparse.Namespace | None = None) -> dict:
    cfg = config.clip
    with Trainer("clip", config, cfg) as trainer:
        run, device = trainer.run, trainer.device

        train_set, holdout_set = load_train_and_holdout(config.data)
        trainer.record_inputs(dataset=train_set.fingerprint())
        clip_model, tokenizer, origin = initial_clip(config, train_set.captions)  # clip.init_from: fine-tune
        check_classes_read_apart(tokenizer, [c.key for c in train_set.classes], train_set.class_prompts(),
                                 "" if cfg.init_from else "clip.max_length")  # init_from's tokenizer has its own
        trainer.print(f"[clip] {len(train_set)} images, {len(train_set.captions)} distinct captions, "
                      f"vocabulary {len(tokenizer)} tokens; {origin}")
        # every caption and its perturbed variants, tokenized once: (K, V + 1, L)
        variants = caption_variants(tokenizer, train_set.captions, cfg.caption_variants, config.seed)
        caption_ids = tokenize(tokenizer, [v for group in variants for v in group]).input_ids
        caption_ids = caption_ids.view(len(variants), cfg.caption_variants + 1, -1).to(device)
        empty_prompt = tokenize(tokenizer, [""]).input_ids.to(device)  # (1, L): a negative in every batch
        choose_captions = CaptionDraw(train_set.caption_ids, device)
        labels = torch.tensor(train_set.labels, device=device)

        model = trainer.add("clip", clip_model)
        logit_scale = trainer.unwrap("clip").logit_scale  # found once: unwrapping walks the model
        trainer.describe_batch()
        total_steps = steps_for(cfg.max_steps, cfg.epochs, len(train_set), trainer.global_batch)
        start = trainer.resume()
        sampler = StepBatches(len(train_set), cfg.batch_size, config.seed, start, trainer.rank, trainer.world_size,
                              cfg.grad_accum)
        training_images = TrainingImages(train_set, sampler, device, config.data.num_workers)
        trainer.print(f"[clip] training images {training_images.describe()}")

        with trainer.running(total_steps):
            for step in range(start, total_steps):
                trainer.set_learning_rate(step)
                trainer.reseed(step)
                for micro in range(cfg.grad_accum):
                    images, rows = training_images.batch(step, micro)  # (B, C, H, W) in [-1, 1], (B,)
                    chosen = choose_captions(rows)  # (B,) one of each image's captions, from the step's seeded generator
                    if train_set.classes:  # same class = positive pair
                        positives = labels[rows][:, None] == labels[rows][None, :]
                    else:  # free captions: identical text = positive pair
                        positives = chosen[:, None] == chosen[None, :]
                    if cfg.augment:  # (the draws keep this order: on the CPU all three share one generator)
                        images = augment_batch(images, config.data.augment)
                    variant = torch.randint(cfg.caption_variants + 1, (len(chosen),), device=device)
                    texts = caption_ids[chosen, variant]  # (B, L)
                    if cfg.empty_prompt_negative:  # (B + 1, L): one more text, matching no image
                        texts = torch.cat([texts, empty_prompt])
                        positives = torch.cat([positives, positives.new_zeros(len(positives), 1)], 1)  # (B, B + 1)
                    with trainer.no_sync("clip", micro):
                        out = model(input_ids=texts, pixel_values=images)
                        loss = contrastive_loss(out.logits_per_image, positives)
                        trainer.backward(loss / cfg.grad_accum)
                trainer.check_finite(trainer.optimizer_step("clip"), step)
                trainer.update_ema(step)
                trainer.log(step, loss=loss.detach(), scale=logit_scale.exp().detach())
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
                run.stamp(folder, "clip", trainer.step)
            with atomic_directory(run.component("tokenizer")) as folder:
                tokenizer.save_pretrained(folder)
                run.stamp(folder, "clip", trainer.step)  # written after text_encoder/: a kill between them shows here
            with atomic_directory(run.component("clip")) as folder:  # both towers: evaluate's CLIP score
                clip.save_pretrained(folder, safe_serialization=True)
            results = {"step": trainer.step, "zero_shot_accuracy": accuracy, "heldout_images": len(holdout_set),
                       "vocab_size": len(tokenizer)}
            prompts = train_set.class_prompts()
            if len(prompts) > 1:  # train-ldm refuses a class prompt that reads like the empty one
                separation = prompt_separation(tokenizer, text_encoder, prompts)
                closest = min(separation, key=separation.get)
                results["closest_to_empty_prompt"] = {"prompt": closest, "separation": separation[closest]}
            trainer.write_log({"event": "final", **results})
            write_json(run.root / "clip_metrics.json", results)
            unmeasurable = zero_shot_unmeasurable(holdout_set)
            trainer.print(f"[clip] zero-shot accuracy on {len(holdout_set)} held-out images: "
                          + (f"not measured ({unmeasurable})" if unmeasurable else f"{accuracy:.2%}"))
            if "closest_to_empty_prompt" in results:
                closest = results["closest_to_empty_prompt"]
                trainer.print(f"[clip] class prompt closest to the empty prompt: '{closest['prompt']}' at "
                              f"{closest['separation']:.2f} of the typical distance between two class prompts")
            trainer.print(f"[clip] saved {run.component('text_encoder')}, {run.component('tokenizer')} and {run.component('clip')}")
        trainer.accelerator.wait_for_everyone()
        return results


def cli(argv: list[str] | None = None) -> None:
    run_cli(__doc__, main, argv)


if __name__ == "__main__":
    cli()
