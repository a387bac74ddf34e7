"""Glyphs that look handwritten, rendered from fonts: the machinery of the rendered sources (`letters`, `devanagari`).

A `Hand` is one font family, shipped as a fontpkg package: its .ttf files and, for a variable font,
the axis settings to draw with. `render_glyph` draws one character (or a shaped cluster such as क्ष)
at 4x, varies its stroke width, slant, rotation, size and position, distorts it elastically and
downsamples it, white on black. `render_classes` renders a whole dataset class by class, the hands
taking turns, records which hand drew each image, and caches the result under
~/.cache/latent-toolkit. `why_not_drawn` finds the characters a font does not really draw: a
.notdef box, no ink, or a copy of another character (small capitals for lowercase, Western digits
for Devanagari ones).
"""

from __future__ import annotations

import functools
import importlib
import io
import multiprocessing
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from common.checkpoint import CheckpointWriteError, write_bytes
from common.errors import DatasetError
from common.seeding import seed_from


@dataclass(frozen=True)
class Hand:
    """One font family: `package` is the fontpkg module that ships it (`from fontpkg_x import ROOT`)."""

    name: str  # what the config and the listing call it, e.g. "kalam"
    package: str  # e.g. "fontpkg_kalam"
    axes: tuple[tuple[float, ...], ...] = ()  # variable fonts: one setting per style, in the font's axis order
    # files inside a package that is not a fontpkg (relative to its folder), e.g. matplotlib's DejaVu fonts
    paths: tuple[str, ...] = ()

    def files(self) -> list[Path]:
        """The family's .ttf files (a static family ships one per weight)."""
        try:
            module = importlib.import_module(self.package)
        except ImportError:
            raise DatasetError(f"the font '{self.name}' is not installed: pip install {self.package.replace('_', '-')}") from None
        if self.paths:
            folder = Path(module.__file__).parent
            missing = [p for p in self.paths if not (folder / p).is_file()]
            if missing:
                raise DatasetError(f"the font '{self.name}' is missing from {folder}: {', '.join(missing)}; reinstall "
                                   f"the package (pip install --force-reinstall {self.package})")
            return [folder / p for p in self.paths]
        root = module.ROOT
        files = sorted((root / "files").glob("*.ttf"))
        if not files:
            raise DatasetError(f"the package {self.package} has no .ttf file in {root / 'files'}")
        return files

    def identity(self) -> str:
        """Changes when the fonts or the styles drawn with change (part of the render cache's key)."""
        return f"{self.name}{[(p.name, p.stat().st_size) for p in self.files()]}{self.axes}"


def fontpkg_hands(names: str) -> tuple[Hand, ...]:
    """Static families named as their fontpkg is ("hind mukta" -> fontpkg_hind, fontpkg_mukta)."""
    return tuple(Hand(name, "fontpkg_" + name.replace("-", "_")) for name in names.split())


@functools.lru_cache(maxsize=64)
def styles(hand: Hand, size: int, shaping: bool) -> tuple[ImageFont.FreeTypeFont, ...]:
    """One font object per file and axis setting: setting a variable font's axes costs ~15 ms, drawing ~1 ms.
    `shaping` lays text out with HarfBuzz (libraqm), which Devanagari clusters need."""
    layout = ImageFont.Layout.RAQM if shaping else ImageFont.Layout.BASIC
    fonts = []
    for path in hand.files():
        for setting in hand.axes or [None]:
            font = ImageFont.truetype(str(path), size, layout_engine=layout)
            if setting is not None:
                font.set_variation_by_axes(list(setting))
            fonts.append(font)
    return tuple(fonts)


# --------------------------------------------------------------------------------------------------
# Which characters a font really draws
# --------------------------------------------------------------------------------------------------

NOTDEF = "\uffff"  # a noncharacter: no font maps it, so it draws the font's .notdef glyph
# A hand that draws one group of characters as copies of another (Permanent Marker's lowercase are small
# capitals; Hind draws the Devanagari digits as Western ones) does not draw that group. Measured median
# similarity of such copies: 0.99-1.00; of true pairs (o/O, x/X, ० and 0 included): 0.45-0.75.
COPY_SIMILARITY = 0.9


def _regular(hand: Hand, shaping: bool) -> ImageFont.FreeTypeFont:
    fonts = styles(hand, 96, shaping)
    return fonts[len(fonts) // 2]  # the middle weight: what a test of the family draws with


def _drawn(font: ImageFont.FreeTypeFont, text: str) -> Image.Image:
    size = 3 * font.size
    image = Image.new("L", (size, size), 0)
    ImageDraw.Draw(image).text((size // 2, size // 2), text, font=font, fill=255, anchor="mm")
    return image


def missing_glyph(hand: Hand, text: str, shaping: bool = False) -> str | None:
    """Why `hand` has no drawing of `text`, or None: a character without a glyph (the font draws its
    .notdef box, often a crossed rectangle) or without ink (some fonts' .notdef is empty)."""
    basic = _regular(hand, False)  # one glyph per character, no shaping
    notdef = np.asarray(_drawn(basic, NOTDEF))
    for char in text:
        drawn = np.asarray(_drawn(basic, char))
        if drawn.max() == 0:
            return f"draws nothing for {char!r} (U+{ord(char):04X})"
        if np.array_equal(drawn, notdef):
            return f"has no glyph for {char!r} (U+{ord(char):04X}): it draws its .notdef box"
    if _drawn(_regular(hand, shaping), text).getbbox() is None:
        return f"draws nothing for {text!r}"
    return None


def similarity(font: ImageFont.FreeTypeFont, a: str, b: str, size: int = 24) -> float:
    """How alike two texts are drawn, whatever their size: the correlation of their ink, each scaled to
    fill a `size` box, centred and blurred a little."""
    def framed(text: str) -> np.ndarray:
        image = _drawn(font, text)
        ink = image.crop(image.getbbox())
        scale = 0.85 * size / max(ink.size)
        ink = ink.resize((max(1, round(ink.width * scale)), max(1, round(ink.height * scale))), Image.Resampling.BOX)
        box = Image.new("L", (size, size), 0)
        box.paste(ink, ((size - ink.width) // 2, (size - ink.height) // 2))
        pixels = np.asarray(box.filter(ImageFilter.GaussianBlur(1)), np.float64)
        return pixels - pixels.mean()

    x, y = framed(a), framed(b)
    return float((x * y).sum() / max(np.sqrt((x * x).sum() * (y * y).sum()), 1e-12))


# --------------------------------------------------------------------------------------------------
# One glyph
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Jitter:
    """How much one drawing of a glyph varies; every draw is uniform in its range."""

    fill: tuple[float, float] = (0.70, 0.86)  # the ink's longer side, as a fraction of the image (EMNIST: 24/28)
    stretch: float = 0.1  # the width is scaled by 1 +- stretch
    rotate: float = 8.0  # degrees, either way
    shear: float = 0.15  # horizontal slant, either way (x shifts by shear * height)
    shift: float = 0.04  # off-centre, as a fraction of the image
    elastic: tuple[float, float] = (0.6, 1.4)  # displacement scale, in pixels of a 32-pixel image
    strokes: tuple[int, ...] = (0,)  # stroke change at 4x, one drawn per glyph: -r thins, +r thickens by r pixels a side


def smooth_field(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """A smooth random field in [-1, 1]: uniform noise on a coarse cells x cells grid, upsampled bicubically."""
    coarse = Image.fromarray(rng.uniform(-1, 1, (cells, cells)).astype(np.float32), "F")
    return np.asarray(coarse.resize((size, size), Image.Resampling.BICUBIC))


def elastic(image: np.ndarray, rng: np.random.Generator, alpha: float, cells: int = 5) -> np.ndarray:
    """Elastic distortion (Simard et al. 2003): a smooth random displacement field, bilinear resampling."""
    h, w = image.shape
    dy, dx = smooth_field(rng, h, cells) * alpha, smooth_field(rng, w, cells) * alpha
    ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    y, x = np.clip(ys + dy, 0, h - 1), np.clip(xs + dx, 0, w - 1)
    y0, x0 = np.floor(y).astype(int), np.floor(x).astype(int)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    fy, fx = y - y0, x - x0
    img = image.astype(np.float32)
    top = img[y0, x0] * (1 - fx) + img[y0, x1] * fx
    bottom = img[y1, x0] * (1 - fx) + img[y1, x1] * fx
    return np.clip(top * (1 - fy) + bottom * fy, 0, 255).astype(np.uint8)


def change_stroke(ink: Image.Image, radius: int) -> Image.Image:
    """Thicker (MaxFilter) or thinner (MinFilter) strokes by `radius` pixels a side; a thinning that would
    erase more than half the ink (a hairline font) is skipped."""
    if radius == 0:
        return ink
    ink = ink.crop((-abs(radius), -abs(radius), ink.width + abs(radius), ink.height + abs(radius)))  # room to grow
    if radius > 0:
        return ink.filter(ImageFilter.MaxFilter(2 * radius + 1))
    thinned = ink.filter(ImageFilter.MinFilter(2 * -radius + 1))
    return thinned if np.asarray(thinned).sum() * 2 > np.asarray(ink).sum() else ink


def render_glyph(text: str, font: ImageFont.FreeTypeFont, rng: np.random.Generator, size: int = 32,
                 jitter: Jitter = Jitter()) -> np.ndarray:
    """One handwritten-looking glyph, white on black, centred and framed like EMNIST: (size, size) uint8.

    Drawn at 4x; the stroke is thickened or thinned, the ink slanted and rotated, cropped to its
    bounding box, scaled so its longer side fills `jitter.fill` of the image, centred (plus a small
    shift), elastically distorted and downsampled.
    """
    canvas = 4 * size
    big = Image.new("L", (2 * canvas, 2 * canvas), 0)
    ImageDraw.Draw(big).text((canvas, canvas), text, font=font, fill=255, anchor="mm")
    box = big.getbbox()
    if box is None:
        raise DatasetError(f"the font {' '.join(font.getname())} draws nothing for {text!r}")
    ink = change_stroke(big.crop(box), int(rng.choice(jitter.strokes)))
    shear = rng.uniform(-jitter.shear, jitter.shear)
    offset = shear * ink.height if shear > 0 else 0.0
    ink = ink.transform((ink.width + round(abs(shear) * ink.height), ink.height), Image.Transform.AFFINE,
                        (1, shear, -offset, 0, 1, 0), resample=Image.Resampling.BICUBIC)  # x_in = x + shear * y
    ink = ink.rotate(rng.uniform(-jitter.rotate, jitter.rotate), resample=Image.Resampling.BICUBIC, expand=True)
    ink = ink.crop(ink.getbbox())
    scale = rng.uniform(*jitter.fill) * canvas / max(ink.size)
    stretch = rng.uniform(1 - jitter.stretch, 1 + jitter.stretch)
    ink = ink.resize((max(1, min(canvas, round(ink.width * scale * stretch))), max(1, round(ink.height * scale))),
                     Image.Resampling.BICUBIC)
    glyph = Image.new("L", (canvas, canvas), 0)
    shift = rng.uniform(-jitter.shift, jitter.shift, 2) * canvas
    glyph.paste(ink, (round((canvas - ink.width) / 2 + shift[0]), round((canvas - ink.height) / 2 + shift[1])))
    distorted = elastic(np.asarray(glyph), rng, alpha=rng.uniform(*jitter.elastic) * canvas / 32)
    return np.asarray(Image.fromarray(distorted).resize((size, size), Image.Resampling.LANCZOS))


# --------------------------------------------------------------------------------------------------
# A dataset of glyphs: class by class, the hands taking turns, cached
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GlyphSet:
    """What a rendered source draws: one text per class, the hands, and how a drawing varies."""

    source: str  # "letters", "devanagari": names the cache file and seeds the draws
    version: int  # bump when the rendering changes, so cached renders are not reused
    texts: tuple[str, ...]  # what each class draws
    hands: tuple[Hand, ...]
    jitter: Jitter = Jitter()
    lookalikes: tuple[str, ...] = ()  # per class, a text its drawing must not copy ("A" for "a"); "" for none
    shaping: bool = False  # HarfBuzz shaping (libraqm), for scripts with clusters
    size: int = 32


@functools.lru_cache(maxsize=32)
def copies_lookalikes(glyphs: GlyphSet, h: int) -> float:
    """The median `similarity` between hand h's drawings of the classes that have a look-alike and of their
    look-alikes ("a" and "A"): near 1 when the hand draws that group as copies of the other."""
    font = _regular(glyphs.hands[h], glyphs.shaping)
    pairs = [(text, other) for text, other in zip(glyphs.texts, glyphs.lookalikes) if other]
    pairs = [(a, b) for a, b in pairs if missing_glyph(glyphs.hands[h], a + b, glyphs.shaping) is None]
    return float(np.median([similarity(font, a, b) for a, b in pairs])) if pairs else 0.0


def why_not_drawn(glyphs: GlyphSet, k: int, h: int) -> str | None:
    """Why hand h does not draw class k, or None when it does: a missing glyph (`missing_glyph`), or a
    group drawn as copies of its look-alikes (`copies_lookalikes` >= COPY_SIMILARITY)."""
    hand, text = glyphs.hands[h], glyphs.texts[k]
    reason = missing_glyph(hand, text, glyphs.shaping)
    if reason is None and glyphs.lookalikes and glyphs.lookalikes[k]:
        alike = copies_lookalikes(glyphs, h)
        if alike >= COPY_SIMILARITY:
            reason = f"draws {text!r} as a copy of {glyphs.lookalikes[k]!r} (its group's median similarity {alike:.2f})"
    return reason


@functools.lru_cache(maxsize=8)
def hands_per_class(glyphs: GlyphSet) -> tuple[tuple[int, ...], ...]:
    """For each class, the indices of the hands that draw it (`why_not_drawn`); a class no hand draws is an error."""
    drawers = []
    for k, text in enumerate(glyphs.texts):
        drawers.append(tuple(h for h in range(len(glyphs.hands)) if why_not_drawn(glyphs, k, h) is None))
        if not drawers[-1]:
            reasons = "; ".join(f"{hand.name} {why_not_drawn(glyphs, k, h)}" for h, hand in enumerate(glyphs.hands))
            raise DatasetError(f"no font of the {glyphs.source} dataset draws {text!r}: {reasons}")
    return tuple(drawers)


def hand_of_image(drawers: tuple[int, ...], i: int) -> int:
    """The hand of a class's image `i`: the class's hands take turns, so each draws an equal share (+-1)."""
    return drawers[i % len(drawers)]


def _render_class(args: tuple[GlyphSet, int, int, int, tuple[int, ...]]) -> tuple[np.ndarray, np.ndarray]:
    glyphs, k, per_class, seed, drawers = args
    images, hands = [], []
    for i in range(per_class):
        rng = np.random.default_rng(seed_from(seed, glyphs.source, k, i))
        h = hand_of_image(drawers, i)
        fonts = styles(glyphs.hands[h], 4 * glyphs.size, glyphs.shaping)
        images.append(render_glyph(glyphs.texts[k], fonts[rng.integers(len(fonts))], rng, glyphs.size, glyphs.jitter))
        hands.append(h)
    return np.stack(images), np.array(hands, dtype=np.int64)


def cache_path(glyphs: GlyphSet, per_class: int, seed: int) -> Path:
    key = seed_from(glyphs.source, glyphs.version, per_class, seed, glyphs.size, glyphs.shaping, glyphs.texts,
                    glyphs.lookalikes, glyphs.jitter, [hand.identity() for hand in glyphs.hands])
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "latent-toolkit"
    return root / f"{glyphs.source}-{key:016x}.npz"


def render_classes(glyphs: GlyphSet, per_class: int, seed: int = 0, processes: int | None = None,
                   before_rendering: Callable[[], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Every class, `per_class` images each, in class order: pixels (K * per_class, size, size) uint8 and
    the index into `glyphs.hands` of the hand that drew each image (K * per_class,).

    Deterministic in (glyphs, per_class, seed); cached as a plain .npz file under ~/.cache/latent-toolkit
    (or $XDG_CACHE_HOME), since rendering tens of thousands of glyphs takes a minute or two. A cache that
    cannot be written (full disk, read-only folder) only warns. `before_rendering` runs on a cache miss,
    before any worker starts (a check that rendering can work here).
    """
    cache = cache_path(glyphs, per_class, seed)
    if cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as stored:
                return stored["pixels"], stored["hands"]
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache is rendered again
    if before_rendering is not None:
        before_rendering()
    drawers = hands_per_class(glyphs)
    jobs = [(glyphs, k, per_class, seed, drawers[k]) for k in range(len(glyphs.texts))]
    processes = processes or min(len(jobs), os.cpu_count() or 1)
    if processes > 1 and per_class * len(jobs) >= 2000:
        with multiprocessing.get_context("spawn").Pool(processes) as pool:
            parts = pool.map(_render_class, jobs)
    else:
        parts = [_render_class(job) for job in jobs]
    pixels, hands = np.concatenate([p for p, _ in parts]), np.concatenate([h for _, h in parts])
    buffer = io.BytesIO()
    np.savez(buffer, pixels=pixels, hands=hands)
    try:
        write_bytes(cache, buffer.getvalue())
    except (OSError, CheckpointWriteError) as error:
        # write_bytes raises CheckpointWriteError (not an OSError) when the disk is full, and a plain
        # OSError when the folder cannot be created or written at all
        reason = str(error).partition(". The previous checkpoint")[0]  # that advice is about checkpoints
        warnings.warn(f"could not cache the rendered {glyphs.source} dataset ({reason}); rendering works, "
                      f"but will be redone next time", UserWarning, stacklevel=2)
    return pixels, hands


def held_out_hand(glyphs: GlyphSet, name: str) -> int:
    """The index of the hand called `name`, which must draw every class: its renders are the held-out split."""
    names = [hand.name for hand in glyphs.hands]
    if name not in names:
        raise DatasetError(f"data.holdout_font={name!r} is not a font of the {glyphs.source} dataset; use one of "
                           f"{', '.join(repr(n) for n in names)}")
    h = names.index(name)
    missing = [glyphs.texts[k] for k, drawers in enumerate(hands_per_class(glyphs)) if h not in drawers]
    if missing:
        raise DatasetError(f"data.holdout_font={name!r} does not draw {' '.join(missing)}, so those classes would have "
                           f"no held-out images; hold out a font that draws every class")
    return h
