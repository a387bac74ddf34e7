"""Writing text as a line of generated glyphs: which class draws each character, and the layout.

Pure PIL/numpy, so the geometry is tested without a model. The glyph images are EMNIST-style (each
character centred and scaled to fill its square cell); `lay_out_line` gives them back the proportions
of handwriting on a line.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import PIL.Image

X_HEIGHT = set("acemnorsuvwxz")  # small letters with neither ascender nor descender
SHORT_ASCENDERS = set("it")  # the dot of i, the cross of t: between x-height and cap height
DESCENDERS = set("gjpqy")


def _spell(text: str, symbols: dict[str, int]) -> tuple[list[int | None], list[str]]:
    """Class indices for `text` by the classes' symbols, longest match first (conjuncts whole), None for
    whitespace; and the characters no symbol starts with, in order of appearance."""
    longest = max(map(len, symbols), default=1)
    glyphs: list[int | None] = []
    unknown: list[str] = []
    i = 0
    while i < len(text):
        if text[i].isspace():
            glyphs.append(None)
            i += 1
            continue
        match = next((text[i:i + n] for n in range(longest, 0, -1) if text[i:i + n] in symbols), None)
        if match is None:
            if text[i] not in unknown:
                unknown.append(text[i])
            i += 1
            continue
        glyphs.append(symbols[match])
        i += len(match)
    return glyphs, unknown


def segment(classes: list[dict], text: str) -> list[int | None]:
    """Class indices for the characters of `text` (None for a space).

    `classes` is a run's class table (`{"key", "fields", "prompt"}` each). Text is spelled with the
    classes' symbols ("2026", "Hello world", "कक्ष", conjuncts matched whole); failing that, words
    separated by spaces may be the classes' one-word names ("ka kha ksha", "two zero"). Raises
    ValueError naming every character no class draws.
    """
    if not isinstance(text, str):
        raise TypeError(f"write() takes the text as a string, e.g. write(\"2026\"); got {type(text).__name__} {text!r}")
    if not text.strip():  # else a blank image of spaces that looks like a model that draws nothing
        raise ValueError(f"write() has nothing to draw in {text!r}: give it at least one character, e.g. write(\"2026\")")
    if len(text.strip().splitlines()) > 1:  # else the lines would be run together as words of one line
        raise ValueError(f"write() draws one line, and {text!r} has a line break: write each line separately")
    if not classes:
        raise ValueError("this pipeline has no class table; write() needs a run trained on a class dataset of characters")
    symbols = {c["fields"]["symbol"]: k for k, c in enumerate(classes) if c["fields"].get("symbol")}
    glyphs, unknown = _spell(text, symbols)
    if not unknown:
        return glyphs
    # one-word names the symbols cannot spell ("two" for an MNIST run; a letters run spells "two" itself)
    names: dict[str, int] = {}
    for k, c in enumerate(classes):
        for field in ("name", "alias"):
            name = str(c["fields"].get(field) or "").lower()
            if name and len(name.split()) == 1 and _spell(name, symbols)[1]:
                names.setdefault(name, k)
    words = text.split()
    if words and all(w.lower() in names for w in words):
        return [names[w.lower()] for w in words]
    hint = f"; or write class names separated by spaces: {' '.join(sorted(names))}" if names else ""
    raise ValueError(f"no class draws {', '.join(repr(c) for c in unknown)} (in {text!r}). "
                     f"Known characters: {' '.join(symbols)}{hint}")


@dataclass(frozen=True)
class LineLayout:
    """How `lay_out_line` sets glyphs on a line. Pixels, or fractions of the cell (a glyph image's size)."""

    gap: int | None = None  # between two glyphs of a word; None: cell // 8
    word_gap: int | None = None  # for a space (instead of the gap); None: cell // 2
    margin: int | None = None  # blank left and right of the line; None: the gap
    threshold: int = 64  # a pixel brighter than this (0-255) is ink
    x_height: float = 0.6  # a c e m n o r s u v w x z are scaled to this; i and t half-way to 1
    descender: float = 0.3  # g j p q y hang this far below the baseline
    blank_width: float = 0.25  # a glyph drawn with no ink still takes this much room

    def __post_init__(self) -> None:
        """Refuse a layout that cannot be drawn (PIL would stop on a negative width) or draws glyphs on each other."""
        for name in ("gap", "word_gap", "margin"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise ValueError(f"LineLayout {name} must be a whole number of pixels >= 0 (or None: the default), "
                                 f"got {value!r}")
        ranges = {"threshold": (0, 254), "x_height": (0.05, 1.0), "descender": (0.0, 1.0), "blank_width": (0.0, 4.0)}
        for name, (low, high) in ranges.items():
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
                raise ValueError(f"LineLayout {name} must be a number in [{low}, {high}], got {value!r}")


def vertical_role(symbol: str) -> str:
    """Where a glyph sits on the line: "x-height", "short", "descender", "hanging" (a Devanagari letter,
    which hangs from its headline) or "tall" (capitals, digits, b d f h k l, and anything else)."""
    if symbol in X_HEIGHT:
        return "x-height"
    if symbol in SHORT_ASCENDERS:
        return "short"
    if symbol in DESCENDERS:
        return "descender"
    if symbol and "\u0900" <= symbol[0] <= "\u097f" and not "\u0966" <= symbol[0] <= "\u096f":
        return "hanging"
    return "tall"


def ink_box(image: PIL.Image.Image, threshold: int) -> tuple[int, int, int, int] | None:
    """(left, top, right, bottom) of the pixels brighter than `threshold`, right/bottom exclusive; None if none."""
    ink = np.asarray(image.convert("L")) > threshold
    if not ink.any():
        return None
    columns, rows = np.flatnonzero(ink.any(0)), np.flatnonzero(ink.any(1))
    return int(columns[0]), int(rows[0]), int(columns[-1]) + 1, int(rows[-1]) + 1


def lay_out_line(symbols: list[str | None], images: list[PIL.Image.Image], size: int,
                 layout: LineLayout = LineLayout()) -> PIL.Image.Image:
    """One line of handwriting from one `size` x `size` glyph image per non-space symbol (None: a space).

    Each glyph is cropped to its ink (the rows and columns with a pixel above `layout.threshold`), so
    its width is its own. Glyphs of a word are `gap` pixels apart; a space is `word_gap` pixels instead.
    The baseline is at y = size: a glyph's ink ends on it; x-height letters are scaled by `x_height`
    (i and t half-way), descenders end `round(descender * size)` pixels below it (the line is that much
    taller when it has one), and Devanagari letters hang from the top instead (their headline at y = 0).
    """
    cell = size
    gap = layout.gap if layout.gap is not None else cell // 8
    word_gap = layout.word_gap if layout.word_gap is not None else cell // 2
    margin = layout.margin if layout.margin is not None else gap
    drop = round(layout.descender * cell)
    placed: list[tuple[int, PIL.Image.Image | None, int]] = []  # (x, crop, top) per glyph
    x, previous_was_glyph = margin, False
    drawn = iter(images)
    for symbol in symbols:
        if symbol is None:
            x += word_gap
            previous_was_glyph = False
            continue
        image = next(drawn)
        x += gap if previous_was_glyph else 0
        previous_was_glyph = True
        box = ink_box(image, layout.threshold)
        if box is None:
            x += round(layout.blank_width * cell)
            continue
        crop = image.crop(box)
        role = vertical_role(symbol)
        scale = {"x-height": layout.x_height, "short": (1 + layout.x_height) / 2}.get(role, 1.0)
        if scale != 1.0:
            crop = crop.resize((max(1, round(crop.width * scale)), max(1, round(crop.height * scale))),
                               PIL.Image.Resampling.LANCZOS)
        top = 0 if role == "hanging" else cell + (drop if role == "descender" else 0) - crop.height
        placed.append((x, crop, top))
        x += crop.width
    has_descender = any(s is not None and vertical_role(s) == "descender" for s in symbols)
    mode = images[0].mode if images else "L"
    line = PIL.Image.new(mode, (x + margin, cell + (drop if has_descender else 0)), 0)
    for left, crop, top in placed:
        line.paste(crop, (left, top))
    return line
