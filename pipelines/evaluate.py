"""evaluate: quality metrics of a run, printed as one JSON object and written to `run/eval.json`.

    evaluate --config configs/mnist.yaml

- VAE: held-out PSNR and SSIM.
- Recognition accuracy: a small CNN, trained here on the training split (cached in `run/evaluator/`),
  classifies images generated for each class prompt; per class and overall, with the classifier's own
  held-out accuracy as the ceiling. With `evaluate.classifier_trained_on: holdout` it learns from the
  held-out split instead (for `letters`: the renders of the held-out font, a hand the model never saw,
  with `evaluate.classifier_print_fonts` also print fonts) and its ceiling is its accuracy on the
  training split. Beside the ceiling, its accuracy on the same images after a VAE round trip: the
  VAE decodes every generated image, so what it blurs away no sampler can draw.
- Frechet distance in that classifier's feature space between generated and held-out images, beside
  the same distance between real training and held-out images (the floor).
- Paraphrase accuracy: the same on prompts that are not training templates ("Sketch the number 4").
- Diversity: mean pairwise feature distance within each class, relative to held-out real images.
- Memorization: the share of generated images that are near-copies of one training image
  (nearest-neighbour ratio test of Carlini et al. 2023), beside the same share for held-out images.

Datasets with free captions (metadata.jsonl) have no classes to recognise: they get a CLIP score and
a Frechet distance in the run's own CLIP space instead (pipelines/caption_quality.py).

Images are sampled with the run's own defaults (`model_index.json` "sampling") unless `--steps` /
`--guidance` are given. With `evaluate.tune: true` those defaults are first tuned (pipelines/tuning.py):
the table goes to `run/sampling_tuning.json` and the chosen setting into `model_index.json`.
"""

from __future__ import annotations

import argparse
import time

import torch

from common.checkpoint import writable_folder, write_json
from common.cli import run_cli
from common.config import Config, dump_config
from common.data import class_prompt, load_train_and_holdout
from common.devices import on_cpu, refuse_multi_process
from common.errors import UserError
from common.run import RunFolder
from ldm.sampling import check_distinct_timesteps
from pipelines.caption_quality import caption_quality
from pipelines.generate import check_sampling_flags, load_pipeline
from pipelines.quality import (class_recognition, classify, frechet_distance, generate_for, near_copy_rate, reader_splits,
                               real_images, recognition_rate, relative_diversity, shape_groups, train_classifier)
from pipelines.tuning import tune_sampling
from vae.reconstruct import reconstruct, reconstruction_metrics


def main(config: Config, args: argparse.Namespace | None = None) -> dict:
    started = time.time()
    refuse_multi_process("evaluate")
    check_sampling_flags(args)  # before the data is read and the classifier trained
    cfg = config.evaluate
    run = RunFolder(config.run_dir)
    # metrics against other images than the run was trained and held out on would be silently wrong (a held-out
    # image it trained on); the seed only draws the samples, and augmentation is for training
    run.check_shared_settings(config, "evaluate", ("data",), ignore=("data.augment.",))
    for stage, component in (("vae", "vae"), ("clip", "text_encoder"), ("clip", "tokenizer"), ("ldm", "unet")):
        run.check_finished(stage, component)  # eval.json is the run's: not an older model than config.yaml describes
    device = torch.device("cpu" if on_cpu() else "cuda")
    print(dump_config(config))
    pipe = load_pipeline(writable_folder(run.root, "run_dir"), device)  # a run with no model yet: a clear error
    pipe.set_progress_bar_config(disable=True)
    if getattr(args, "steps", None) is not None:  # more steps than this sampler can take: refused before the data is
        pipe.scheduler.set_timesteps(args.steps)  # read and the classifier trained, not when sampling starts
        try:
            check_distinct_timesteps(pipe.scheduler)
        except ValueError as error:
            raise UserError(str(error)) from None
    train_set, holdout_set = load_train_and_holdout(config.data)
    vae_metrics = reconstruction_metrics(pipe.vae.float(), holdout_set, len(holdout_set))
    if not train_set.classes:  # free captions: no classifier, the run's own CLIP instead
        return evaluate_captions(pipe, run, config, args, train_set, holdout_set, vae_metrics, started)
    classifier, ceiling = train_classifier(config, train_set, holdout_set, device)
    holdout, train_images = real_images(holdout_set), real_images(train_set)
    _, holdout_features = classify(classifier, holdout, device)
    holdout_labels = torch.tensor(holdout_set.labels)
    names = [c.fields.get("name", c.key) for c in train_set.classes]
    prompts = train_set.class_prompts()
    per_class = cfg.images_per_class
    reference = train_images[torch.randperm(len(train_images), generator=torch.Generator().manual_seed(0))[:len(prompts) * per_class]]
    floor = frechet_distance(classify(classifier, reference, device)[1], holdout_features)
    groups = shape_groups(train_set.classes)  # case pairs of one shape (C/c ...) count as one
    # the ceiling's images through the VAE, which decodes every generated image: how much legibility the latents keep
    ceiling_set = reader_splits(cfg, train_set, holdout_set)[1]
    ceiling_images = train_images if ceiling_set is train_set else holdout
    # left on the device, where they are classified: not read back chunk by chunk
    decoded = torch.cat([reconstruct(pipe.vae, chunk.to(device)) for chunk in ceiling_images.split(256)])
    vae_ceiling = recognition_rate(classifier, decoded, torch.tensor(ceiling_set.labels), groups, device)

    results: dict = {"run": str(run.root)}
    if cfg.tune:  # the run's own sampling defaults, chosen by a stated rule and saved with the run
        tuning = tune_sampling(pipe, classifier, prompts, holdout_features, holdout_labels, floor, config, device, groups)
        write_json(run.root / "sampling_tuning.json", tuning)
        run.update_model_index(sampling=tuning["chosen"])
        pipe.register_to_config(sampling=tuning["chosen"])
        results["tuning"] = {"rule": tuning["rule"], "chosen": tuning["chosen"], "table": "sampling_tuning.json"}
    steps, guidance = pipe.sampling_defaults(getattr(args, "steps", None), getattr(args, "guidance", None))
    interval = pipe.default_guidance_interval(getattr(args, "guidance_interval", None))
    results.update({"sampler": type(pipe.scheduler).__name__, "num_inference_steps": steps, "guidance_scale": guidance,
                    "guidance_interval": list(interval),
                    "vae": {"heldout_psnr": vae_metrics["psnr"], "heldout_ssim": vae_metrics["ssim"]}})

    measured = class_recognition(pipe, classifier, prompts, per_class, config.seed, device, steps, guidance, groups=groups,
                                 guidance_interval=interval)
    by_name = dict(zip(names, measured["per_class"]))
    results["recognition"] = {"accuracy": measured["accuracy"], "per_class": by_name, "min_class": min(by_name.values()),
                              "classifier_heldout_accuracy": ceiling, "vae_reconstruction_accuracy": vae_ceiling,
                              "classifier_trained_on": cfg.classifier_trained_on, "prompts": prompts, "images_per_class": per_class}
    fd = frechet_distance(measured["features"], holdout_features)
    results["frechet"] = {"generated_vs_heldout": fd, "train_vs_heldout_floor": floor, "ratio": fd / max(floor, 1e-12)}
    results["diversity"] = relative_diversity(measured["features"], measured["labels"], holdout_features, holdout_labels,
                                              len(names))
    results["memorization"] = {"rate": near_copy_rate(measured["images"], train_images),
                               "heldout_rate": near_copy_rate(holdout, train_images)}

    if cfg.paraphrases:
        items = [(template, k, prompt) for template in cfg.paraphrases for k, c in enumerate(train_set.classes)
                 if (prompt := class_prompt(c.fields, [template])) is not None]
        per_prompt = max(1, per_class // len(cfg.paraphrases))
        para_images = generate_for(pipe, [prompt for _, _, prompt in items], per_prompt, config.seed + 1, steps, guidance,
                                   desc="paraphrases", guidance_interval=interval)
        para_predicted = classify(classifier, para_images, device)[0].view(len(items), per_prompt)
        para_correct = groups[para_predicted].eq(groups[torch.tensor([k for _, k, _ in items])][:, None]).float()
        by_template = {t: para_correct[[i for i, item in enumerate(items) if item[0] == t]].mean().item()
                       for t in cfg.paraphrases}
        results["paraphrase"] = {"accuracy": para_correct.mean().item(), "per_template": by_template,
                                 "images_per_prompt": per_prompt}

    results["evaluation_seconds"] = time.time() - started
    print(write_json(run.root / "eval.json", results))
    weakest = min(by_name, key=by_name.get)
    print(f"[evaluate] recognition {measured['accuracy']:.1%} (weakest: {weakest} {by_name[weakest]:.0%}; the classifier's "
          f"ceiling {ceiling:.1%} on real images, {vae_ceiling:.1%} on their VAE reconstructions), "
          f"FD ratio {results['frechet']['ratio']:.2f}, diversity {results['diversity']['relative']:.2f}, "
          f"at {steps} steps, guidance {guidance} (guided steps {list(interval)}); written to {run.root / 'eval.json'}")
    return results


def evaluate_captions(pipe, run: RunFolder, config: Config, args, train_set, holdout_set, vae_metrics: dict,
                      started: float) -> dict:
    """CLIP score and Frechet distance in the run's CLIP space, for datasets without classes."""
    if config.evaluate.tune:
        print("[evaluate] evaluate.tune picks sampling defaults by class recognition; this dataset has no classes, "
              "so the run keeps its defaults")
    steps, guidance = pipe.sampling_defaults(getattr(args, "steps", None), getattr(args, "guidance", None))
    interval = pipe.default_guidance_interval(getattr(args, "guidance_interval", None))  # as class datasets use it
    results = {"run": str(run.root), "sampler": type(pipe.scheduler).__name__, "num_inference_steps": steps,
               "guidance_scale": guidance, "guidance_interval": list(interval),
               "vae": {"heldout_psnr": vae_metrics["psnr"], "heldout_ssim": vae_metrics["ssim"]},
               **caption_quality(pipe, config, train_set, holdout_set, steps, guidance, interval),
               "evaluation_seconds": time.time() - started}
    print(write_json(run.root / "eval.json", results))
    score, fd = results["clip_score"], results["frechet_clip"]
    print(f"[evaluate] CLIP score {score['generated']:.1f} (real held-out {score['real_heldout']:.1f}, shuffled captions "
          f"{score['real_shuffled_captions']:.1f}), CLIP-space FD ratio {fd['ratio']:.2f}, at {steps} steps, guidance "
          f"{guidance}; relative measures for runs of this dataset; written to {run.root / 'eval.json'}")
    return results


def cli(argv: list[str] | None = None) -> None:
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--steps", type=int, default=None, help="sampler steps (default: the run's own)")
        parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the run's tuned value)")
        parser.add_argument("--guidance-interval", nargs=2, type=float, default=None, metavar=("START", "STOP"),
                            help="guide only this fraction of the steps (default: the run's tuned interval)")

    run_cli(__doc__, main, argv, add_arguments=add_arguments, config_required=False)


if __name__ == "__main__":
    cli()
