"""A folder of digits in one handwriting font, one sub-folder per digit name (zero/ ... nine/): a stand-in
for "a small folder of your own digits" in the README's fine-tuning recipe.

    python scripts/font_digits.py OUT [--font permanent-marker] [--per-class 60] [--seed 0]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from common.checkpoint import writable_folder
from common.data.glyph_render import render_glyph, styles
from common.data.letters import DIGIT_WORDS, HANDS, JITTER
from common.errors import UserError
from common.seeding import seed_from


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--font", default="permanent-marker", choices=[h.name for h in HANDS])
    parser.add_argument("--per-class", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.per_class < 1:
        parser.error(f"--per-class must be at least 1 (got {args.per_class})")
    # OUT may be the user's own digits folder (the README's "or your own folder"): never replace a file in it
    planned = [args.out / word / f"{i:04d}.png" for word in DIGIT_WORDS for i in range(args.per_class)]
    existing = [str(path) for path in planned if path.exists()]
    if existing:
        parser.error(f"{args.out} already holds {existing[0]}" + (f" and {len(existing) - 1} more" if len(existing) > 1 else "")
                     + ", which this would replace; choose another OUT, or remove those files first")
    try:
        writable_folder(args.out, "OUT")
    except UserError as error:
        parser.error(str(error))
    fonts = styles(next(h for h in HANDS if h.name == args.font), 128, False)
    for digit, word in enumerate(DIGIT_WORDS):
        folder = args.out / word
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(args.per_class):
            rng = np.random.default_rng(seed_from(args.seed, "font-digits", args.font, digit, i))
            pixels = render_glyph(str(digit), fonts[i % len(fonts)], rng, 32, JITTER)
            Image.fromarray(pixels).save(folder / f"{i:04d}.png")
    print(f"wrote {10 * args.per_class} digits in {args.font} to {args.out}/<zero..nine>/")


if __name__ == "__main__":
    main()
