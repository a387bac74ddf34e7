"""The built-in `devanagari` source: the 46 classes of the Devanagari Handwritten Character Dataset
(Acharya et al. 2015), rendered from a variable font with a hand's variation.

It owns the class table, used for the real dataset's folders too: folder names are the dataset's own
(`character_1_ka` ... `character_36_gya`, `digit_0` ... `digit_9`), and each class gets caption fields:
a readable romanized `name`, its Devanagari `symbol`, its `kind`, and `letter` or `digit` (so a
template like "Draw the letter {letter}" only applies to letters).
"""

from __future__ import annotations

import functools
import io
import multiprocessing
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, features

from common.checkpoint import CheckpointWriteError, write_bytes
from common.config import DataConfig
from common.data.listing import ImageClass, Listing, split_last
from common.errors import DatasetError
from common.seeding import seed_from

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
# The built-in `devanagari` dataset: the 46 classes rendered from a variable font, with a hand's variation
# --------------------------------------------------------------------------------------------------

RENDER_VERSION = 1  # bump when the renderer changes, so cached renders are not reused
CLASSES = CONSONANTS + DIGITS


def font_path() -> Path:
    from fontpkg_noto_sans_devanagari import ROOT

    return next((ROOT / "files").glob("*.ttf"))


WEIGHTS = np.linspace(250, 850, 13)  # the font's wght axis: thin to heavy strokes
WIDTHS = (70, 85, 100)  # its wdth axis


def require_shaping() -> None:
    """Raise DatasetError unless Pillow can shape text (libraqm): without it Pillow silently falls back
    to basic layout and the conjuncts क्ष, त्र, ज्ञ are drawn as separate letters."""
    if not features.check("raqm"):
        raise DatasetError(
            "rendering the Devanagari dataset needs Pillow with libraqm (text shaping): without it the "
            "conjuncts क्ष, त्र, ज्ञ come out as separate letters. Install a Pillow built with raqm (the PyPI "
            "wheels include it: pip install --force-reinstall pillow), or train on the real dataset with "
            "data.name= and data.path=...")


@functools.lru_cache(maxsize=4)
def _fonts(size: int, shaping: bool) -> list[ImageFont.FreeTypeFont]:
    """One font object per (weight, width): changing a variable font's axes costs ~15 ms, drawing ~1 ms."""
    layout = ImageFont.Layout.RAQM if shaping else ImageFont.Layout.BASIC
    fonts = []
    for weight in WEIGHTS:
        for width in WIDTHS:
            font = ImageFont.truetype(str(font_path()), size, layout_engine=layout)
            font.set_variation_by_axes([float(weight), float(width)])  # axes in the font's order: wght, wdth
            fonts.append(font)
    return fonts


def _smooth_field(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """A smooth random field in [-1, 1]: uniform noise on a coarse cells x cells grid, upsampled bicubically."""
    coarse = Image.fromarray(rng.uniform(-1, 1, (cells, cells)).astype(np.float32), "F")
    return np.asarray(coarse.resize((size, size), Image.Resampling.BICUBIC))


def _elastic(image: np.ndarray, rng: np.random.Generator, alpha: float, cells: int = 5) -> np.ndarray:
    """Elastic distortion (Simard et al. 2003): a smooth random displacement field, bilinear resampling."""
    h, w = image.shape
    dy, dx = _smooth_field(rng, h, cells) * alpha, _smooth_field(rng, w, cells) * alpha
    ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    y, x = np.clip(ys + dy, 0, h - 1), np.clip(xs + dx, 0, w - 1)
    y0, x0 = np.floor(y).astype(int), np.floor(x).astype(int)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    fy, fx = y - y0, x - x0
    img = image.astype(np.float32)
    top = img[y0, x0] * (1 - fx) + img[y0, x1] * fx
    bottom = img[y1, x0] * (1 - fx) + img[y1, x1] * fx
    return np.clip(top * (1 - fy) + bottom * fy, 0, 255).astype(np.uint8)


def render_glyph(text: str, rng: np.random.Generator, size: int = 32, shaping: bool = True) -> np.ndarray:
    """One handwritten-looking glyph, white on black like the Devanagari dataset: (size, size) uint8.

    Drawn at 4x with a random stroke weight (the font's wght axis) and width, scaled, rotated, shifted
    and elastically distorted, then downsampled. `shaping=False` skips HarfBuzz shaping (for tests:
    conjuncts such as क्ष then fall apart into their parts). Raises DatasetError when shaping is asked
    for but Pillow has no libraqm.
    """
    if shaping:
        require_shaping()
    canvas = 4 * size
    fonts = _fonts(canvas, shaping)
    font = fonts[rng.integers(len(fonts))]
    big = Image.new("L", (2 * canvas, 2 * canvas), 0)
    ImageDraw.Draw(big).text((canvas, canvas), text, font=font, fill=255, anchor="mm")
    ink = big.crop(big.getbbox())
    scale = rng.uniform(0.62, 0.82) * canvas / max(ink.size)  # the glyph fills 62-82% of the box
    ink = ink.resize((max(1, round(ink.width * scale * rng.uniform(0.9, 1.1))), max(1, round(ink.height * scale))),
                     Image.Resampling.BICUBIC)
    ink = ink.rotate(rng.uniform(-10, 10), resample=Image.Resampling.BICUBIC, expand=True)
    glyph = Image.new("L", (canvas, canvas), 0)
    shift = rng.uniform(-0.06, 0.06, 2) * canvas
    glyph.paste(ink, (round((canvas - ink.width) / 2 + shift[0]), round((canvas - ink.height) / 2 + shift[1])))
    distorted = _elastic(np.asarray(glyph), rng, alpha=rng.uniform(0.6, 1.4) * canvas / 32)
    return np.asarray(Image.fromarray(distorted).resize((size, size), Image.Resampling.LANCZOS))


def _render_class(args: tuple[int, int, int]) -> np.ndarray:
    class_index, per_class, seed = args
    text = CLASSES[class_index][2]
    return np.stack([render_glyph(text, np.random.default_rng(seed_from(seed, "devanagari", class_index, i)))
                     for i in range(per_class)])


def render_dataset(per_class: int, seed: int = 0, processes: int | None = None) -> np.ndarray:
    """All 46 classes, `per_class` images each, in class order: (46 * per_class, 32, 32) uint8.

    Deterministic in (per_class, seed); cached under ~/.cache/latent-toolkit (or $XDG_CACHE_HOME) as
    a plain .npy file, since rendering 92,000 glyphs takes a minute or two. A cached render loads
    without libraqm; rendering needs it (DatasetError otherwise). A cache that cannot be written
    (full disk, read-only folder) only warns.
    """
    key = f"{seed_from(RENDER_VERSION, per_class, seed, font_path().stat().st_size):016x}"
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "latent-toolkit" / f"devanagari-{key}.npy"
    if cache.is_file():
        try:
            return np.load(cache, allow_pickle=False)
        except (OSError, ValueError):
            pass  # a damaged cache is rendered again
    require_shaping()  # before starting any worker processes
    jobs = [(k, per_class, seed) for k in range(len(CLASSES))]
    processes = processes or min(len(jobs), os.cpu_count() or 1)
    if processes > 1 and per_class * len(CLASSES) >= 2000:
        with multiprocessing.get_context("spawn").Pool(processes) as pool:
            parts = pool.map(_render_class, jobs)
    else:
        parts = [_render_class(job) for job in jobs]
    pixels = np.concatenate(parts)
    buffer = io.BytesIO()
    np.save(buffer, pixels, allow_pickle=False)
    try:
        write_bytes(cache, buffer.getvalue())
    except (OSError, CheckpointWriteError) as error:
        # write_bytes raises CheckpointWriteError (not an OSError) when the disk is full, and a plain
        # OSError when the folder cannot be created or written at all
        reason = str(error).partition(". The previous checkpoint")[0]  # that advice is about checkpoints
        warnings.warn(f"could not cache the rendered Devanagari dataset ({reason}); rendering works, "
                      f"but will be redone next time", UserWarning, stacklevel=2)
    return pixels


def list_devanagari(config: DataConfig) -> Listing:
    """Rendered glyphs of the 46 classes, the last holdout_fraction of each held out."""
    pixels = render_dataset(config.per_class, config.seed)
    labels = np.repeat(np.arange(len(CLASSES)), config.per_class).tolist()
    classes = [ImageClass(folder, class_fields(folder)) for folder, _, _ in CLASSES]
    identity = f"devanagari:v{RENDER_VERSION}:{config.per_class}:{config.seed}"
    return Listing(list(range(len(labels))), labels, split_last(labels, config.holdout_fraction), classes,
                   CAPTIONS, pixels=pixels, identity=identity)
