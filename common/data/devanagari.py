"""The built-in `devanagari` source: the 46 classes of the Devanagari Handwritten Character Dataset
(Acharya et al. 2015), rendered from four fonts (Noto Sans Devanagari, Kalam, Hind, Mukta) with a
hand's variation (`glyph_render`), the font of each image recorded.

It owns the class table, used for the real dataset's folders too: folder names are the dataset's own
(`character_1_ka` ... `character_36_gya`, `digit_0` ... `digit_9`), and each class gets caption fields:
a readable romanized `name`, its Devanagari `symbol`, its `kind`, and `letter` or `digit` (so a
template like "Draw the letter {letter}" only applies to letters).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import features

from common.config import DataConfig
from common.data.glyph_render import GlyphSet, Hand, Jitter, cache_path, held_out_hand, render_classes, styles
from common.data.glyph_render import render_glyph as draw_glyph
from common.data.listing import ImageClass, Listing, split_last
from common.errors import DatasetError

# (folder name, romanized name, Devanagari); the last three are conjuncts that need shaping.
CONSONANTS = [
    ("character_1_ka", "ka", "क"), ("character_2_kha", "kha", "ख"), ("character_3_ga", "ga", "ग"),
    ("character_4_gha", "gha", "घ"), ("character_5_kna", "nga", "ङ"), ("character_6_cha", "cha", "च"),
    ("character_7_chha", "chha", "छ"), ("character_8_ja", "ja", "ज"), ("character_9_jha", "jha", "झ"),
    ("character_10_yna", "nya", "ञ"), ("character_11_taamatar", "tta", "ट"), ("character_12_thaa", "ttha", "ठ"),
    ("character_13_daa", "dda", "ड"), ("character_14_dhaa", "ddha", "ढ"), ("character_15_adna", "nna", "ण"),
    ("character_16_tabala", "ta", "त"), ("character_17_tha", "tha", "थ"), ("character_18_da", "da", "द"),
    ("character_19_dha", "dha", "ध"), ("character_20_na", "na", "न"), ("character_21_pa", "pa", "प"),
    ("character_22_pha", "pha", "फ"), ("character_23_ba", "ba", "ब"), ("character_24_bha", "bha", "भ"),
    ("character_25_ma", "ma", "म"), ("character_26_yaw", "ya", "य"), ("character_27_ra", "ra", "र"),
    ("character_28_la", "la", "ल"), ("character_29_waw", "va", "व"), ("character_30_motosaw", "sha", "श"),
    ("character_31_petchiryakha", "ssa", "ष"), ("character_32_patalosaw", "sa", "स"), ("character_33_ha", "ha", "ह"),
    ("character_34_chhya", "ksha", "क्ष"), ("character_35_tra", "tra", "त्र"), ("character_36_gya", "gya", "ज्ञ"),
]
DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DIGITS = [(f"digit_{d}", DIGIT_WORDS[d], "०१२३४५६७८९"[d]) for d in range(10)]

CLASS_FIELDS = {
    **{folder: {"name": name, "symbol": symbol, "kind": "letter", "letter": name, "alias": folder.split("_", 2)[2]}
       for folder, name, symbol in CONSONANTS},
    **{folder: {"name": name, "symbol": symbol, "kind": "digit", "digit": name, "alias": folder.split("_")[1]}
       for folder, name, symbol in DIGITS},
}


CAPTIONS = [
    "Draw the letter {letter}", "the letter {letter}", "Draw the Devanagari digit {digit}",
    "the Devanagari digit {digit}", "{symbol}", "Draw {symbol}", "a handwritten {symbol}",
    "the Devanagari {kind} {name}", "Draw the Devanagari {kind} {name}", "{name}",
]


def class_fields(folder: str) -> dict | None:
    """Caption fields for a folder name of the Devanagari dataset, or None for any other name."""
    fields = CLASS_FIELDS.get(folder)
    return dict(fields) if fields is not None else None


# --------------------------------------------------------------------------------------------------
# The built-in `devanagari` dataset: the 46 classes rendered from four fonts, with a hand's variation
# --------------------------------------------------------------------------------------------------

RENDER_VERSION = 2  # bump when the renderer changes, so cached renders are not reused (2: four fonts)
CLASSES = CONSONANTS + DIGITS

WEIGHTS = np.linspace(250, 850, 13)  # Noto Sans Devanagari's wght axis: thin to heavy strokes
WIDTHS = (70, 85, 100)  # its wdth axis
NOTO = Hand("noto-sans-devanagari", "fontpkg_noto_sans_devanagari",
            tuple((float(weight), float(width)) for weight in WEIGHTS for width in WIDTHS))  # axes in the font's order
# Kalam is handwriting; Hind (5 weights) and Mukta (7) are further print styles. Hind draws the
# Devanagari digits as Western ones (why_not_drawn finds it), so the digits come from the other three.
HANDS = (NOTO, Hand("kalam", "fontpkg_kalam"), Hand("hind", "fontpkg_hind"), Hand("mukta", "fontpkg_mukta"))
JITTER = Jitter(fill=(0.62, 0.82), stretch=0.1, rotate=10.0, shear=0.0, shift=0.06)
GLYPHS = GlyphSet("devanagari", RENDER_VERSION, tuple(text for _, _, text in CLASSES), HANDS, JITTER,
                  lookalikes=tuple(str(DIGIT_WORDS.index(name)) if folder.startswith("digit_") else ""
                                   for folder, name, _ in CLASSES),  # a Devanagari digit must not be drawn as a Western one
                  shaping=True)


def font_path() -> Path:
    """The variable font the dataset started with (Noto Sans Devanagari)."""
    return NOTO.files()[0]


def require_shaping() -> None:
    """Raise DatasetError unless Pillow can shape text (libraqm): without it Pillow silently falls back
    to basic layout and the conjuncts क्ष, त्र, ज्ञ are drawn as separate letters."""
    if not features.check("raqm"):
        raise DatasetError(
            "rendering the Devanagari dataset needs Pillow with libraqm (text shaping): without it the "
            "conjuncts क्ष, त्र, ज्ञ come out as separate letters. Install a Pillow built with raqm (the PyPI "
            "wheels include it: pip install --force-reinstall pillow), or train on the real dataset with "
            "data.name= and data.path=...")


def render_glyph(text: str, rng: np.random.Generator, size: int = 32, shaping: bool = True, hand: Hand = NOTO) -> np.ndarray:
    """One handwritten-looking glyph in `hand`, white on black like the Devanagari dataset: (size, size) uint8.
    `shaping=False` skips HarfBuzz shaping (for tests: conjuncts such as क्ष then fall apart into their
    parts). Raises DatasetError when shaping is asked for but Pillow has no libraqm."""
    if shaping:
        require_shaping()
    fonts = styles(hand, 4 * size, shaping)
    return draw_glyph(text, fonts[rng.integers(len(fonts))], rng, size, JITTER)


def render_dataset(per_class: int, seed: int = 0, processes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All 46 classes, `per_class` images each, in class order: pixels (46 * per_class, 32, 32) uint8 and the
    index into HANDS of the font that drew each image. The fonts that draw a class take turns.

    Deterministic in (per_class, seed) and cached (`glyph_render.render_classes`). A cached render loads
    without libraqm; rendering needs it (DatasetError otherwise).
    """
    return render_classes(GLYPHS, per_class, seed, processes, before_rendering=require_shaping)


def list_devanagari(config: DataConfig) -> Listing:
    """Rendered glyphs of the 46 classes: the last holdout_fraction of each held out, or, with
    data.holdout_font, every image of that font."""
    # a font that is not the dataset's is refused before the minutes of rendering, not after
    held = held_out_hand(GLYPHS, config.holdout_font) if config.holdout_font else None
    pixels, hands = render_dataset(config.per_class, config.seed)
    labels = np.repeat(np.arange(len(CLASSES)), config.per_class).tolist()
    if held is not None:
        holdout = [bool(h == held) for h in hands]
    else:
        holdout = split_last(labels, config.holdout_fraction)
    classes = [ImageClass(folder, class_fields(folder)) for folder, _, _ in CLASSES]
    identity = (f"devanagari:v{RENDER_VERSION}:{config.per_class}:{config.seed}:"
                f"{cache_path(GLYPHS, config.per_class, config.seed).stem}:holdout_font={config.holdout_font}")
    return Listing(list(range(len(labels))), labels, holdout, classes, CAPTIONS, pixels=pixels, identity=identity,
                   fonts=[HANDS[h].name for h in hands])
