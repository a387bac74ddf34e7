"""A folder of digits in one handwriting font, one sub-folder per digit name (zero/ ... nine/): a stand-in
for "a small folder of your own digits" in the README's fine-tuning recipe.

    python scripts/font_digits.py OUT [--font permanent-marker] [--per-class 60] [--seed 0]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from common.data.glyph_render import render_glyph, styles
from common.data.letters import DIGIT_WORDS, HANDS, JITTER
from common.seeding import seed_from


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--font", default="permanent-marker", choices=[h.name for h in HANDS])
    parser.add_argument("--per-class", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
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
