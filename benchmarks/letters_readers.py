"""Reader or generator? Where a letters run's recognition is lost (BENCHMARKS.md, "Letters").

    python benchmarks/letters_readers.py --run checkpoints/letters [--guidance 2.5 5.0] [--out FILE.json]

`evaluate` reads generated glyphs with a classifier that never saw the five hands the model learns
(the held-out hand and print fonts). Its recognition mixes three losses; this separates them:

1. within the hands: the same CNN and loop trained on a random half of the training hands' renders,
   tested on the other half: how far the shapes themselves (EMNIST framing, these fonts) let a reader go;
2. the VAE: evaluate's reader on training renders as rendered and after the run's VAE round trip,
   which decodes every generated image;
3. the generator: the run's samples (8 per class) read by evaluate's reader and by a reader of all
   the training hands' renders (which knows how these hands write, so its mistakes are the generator's).

Takes ~15 min on 2 CPU cores (two readers of 2,000 and 3,000 steps, plus evaluate's own unless the
run caches it). Deterministic on one machine: every reader and sample is seeded.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.checkpoint import writable_file  # noqa: E402
from common.config import ConfigError  # noqa: E402
from common.config_yaml import load_config  # noqa: E402
from common.data import load_train_and_holdout  # noqa: E402
from common.errors import UserError  # noqa: E402
from common.run import RunFolder  # noqa: E402
from pipelines.generate import load_pipeline  # noqa: E402
from pipelines.quality import (DigitClassifier, classify, fit_classifier, generate_for, real_images,  # noqa: E402
                               recognition_rate, shape_groups, train_classifier)
from vae.reconstruct import reconstruct  # noqa: E402


def reading(reader: DigitClassifier, images: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor,
            keys: list[str], device: torch.device, n: int = 8) -> dict:
    """How `reader` reads `images`: its accuracy by shape group (as `evaluate`) and its `n` commonest mistakes."""
    predicted = classify(reader, images, device)[0]
    wrong = groups[predicted].ne(groups[labels])
    pairs = Counter(f"{keys[t]} as {keys[p]}" for t, p in zip(labels[wrong].tolist(), predicted[wrong].tolist()))
    return {"accuracy": (~wrong).float().mean().item(),
            "mistakes": [f"{pair} ({count})" for pair, count in pairs.most_common(n)]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="a trained letters run folder")
    parser.add_argument("--config", default="configs/letters.yaml", help="the config evaluate reads the run with")
    parser.add_argument("--guidance", type=float, nargs="+", default=[2.5, 5.0])
    parser.add_argument("--per-class", type=int, default=8)
    parser.add_argument("--out", help="also write the results here as JSON")
    args = parser.parse_args(argv)
    # else found only when sampling, after the readers have trained (minutes)
    if args.per_class < 1:
        parser.error(f"--per-class must be at least 1 (got {args.per_class})")
    if not all(math.isfinite(g) for g in args.guidance):
        parser.error(f"--guidance takes finite scales, e.g. --guidance 2.5 5.0 (got {' '.join(map(str, args.guidance))})")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:  # before the readers train (minutes): the run, that it was trained on --config's data, and --out
        config = load_config(args.config, [f"run_dir={args.run}"])
        pipe = load_pipeline(args.run, device)
        RunFolder(args.run).check_shared_settings(config, "letters_readers")  # else its samples read as another dataset's
        if args.out:
            writable_file(args.out, "--out", "readers.json")
    except (ConfigError, UserError) as error:
        parser.error(str(error))
    pipe.set_progress_bar_config(disable=True)
    train_set, holdout_set = load_train_and_holdout(config.data)
    groups, keys = shape_groups(train_set.classes), [c.key for c in train_set.classes]
    hands_x, hands_y = real_images(train_set), torch.tensor(train_set.labels)
    classes, channels = len(train_set.classes), config.data.channels
    results: dict = {"run": args.run}

    # 1. within the hands: train on half of their renders, read the other half
    order = torch.randperm(len(hands_x), generator=torch.Generator().manual_seed(0))
    half, rest = order[: len(order) // 2], order[len(order) // 2:]
    torch.manual_seed(0)
    within = fit_classifier(DigitClassifier(channels, classes).to(device), hands_x[half].to(device),
                            hands_y[half].to(device), 2000, 128, desc="reader of half the hands")
    results["within_hands"] = reading(within, hands_x[rest], hands_y[rest], groups, keys, device)
    print("within the hands:", results["within_hands"], flush=True)

    # 2. the VAE round trip, read by evaluate's reader
    heldout_reader, _ = train_classifier(config, train_set, holdout_set, device)
    vae = pipe.vae.float()
    decoded = torch.cat([reconstruct(vae, chunk.to(device)).cpu() for chunk in hands_x.split(256)])
    results["vae"] = {"as_rendered": recognition_rate(heldout_reader, hands_x, hands_y, groups, device),
                      "after_round_trip": recognition_rate(heldout_reader, decoded, hands_y, groups, device)}
    print("evaluate's reader on the training hands:", results["vae"], flush=True)

    # 3. the samples, read by evaluate's reader and by a reader of all the training hands
    torch.manual_seed(0)
    knows_hands = fit_classifier(DigitClassifier(channels, classes).to(device), hands_x.to(device), hands_y.to(device),
                                 3000, 128, desc="reader of the hands")
    prompts, labels = train_set.class_prompts(), torch.arange(classes).repeat_interleave(args.per_class)
    results["samples"] = {}
    for guidance in args.guidance:
        images = generate_for(pipe, prompts, args.per_class, config.seed, None, guidance)
        row = {name: reading(reader, images, labels, groups, keys, device)
               for name, reader in (("heldout_reader", heldout_reader), ("reader_of_the_hands", knows_hands))}
        results["samples"][str(guidance)] = row
        print(f"samples at guidance {guidance}:", row, flush=True)

    print(json.dumps(results, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
