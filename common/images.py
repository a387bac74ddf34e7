"""Grids of images, optionally labelled, for sample sheets and the README."""

from __future__ import annotations

import unicodedata
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, features

from common.checkpoint import write_bytes


def label_font(size: int = 12) -> ImageFont.ImageFont:
    """A font that also covers Devanagari, for labels like "Draw the letter ka (क)"."""
    try:
        from fontpkg_noto_sans_devanagari import ROOT

        path = next((ROOT / "files").glob("*.ttf"))
        return ImageFont.truetype(str(path), size)
    except (ImportError, StopIteration, OSError):
        return ImageFont.load_default(size)


def needs_shaping(text: str) -> bool:
    """Whether `text` has combining marks (a Devanagari vowel sign or virama, as in क्ष or कि), which only text
    shaping (libraqm) draws in place: basic layout sets them after their letter."""
    return any(unicodedata.category(c) in ("Mn", "Mc") for c in text)


def make_grid(images: list[Image.Image], columns: int, row_labels: list[str] | None = None,
              column_labels: list[str] | None = None, scale: int = 1, padding: int = 2) -> Image.Image:
    """Tile images row by row; labels (if any) go left of each row and above each column."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    # one line each, white space collapsed as CLIP's tokenizer reads a prompt (PIL cannot anchor or measure a line break)
    row_labels = [" ".join(t.split()) for t in row_labels] if row_labels else row_labels
    column_labels = [" ".join(t.split()) for t in column_labels] if column_labels else column_labels
    if not features.check("raqm") and any(needs_shaping(t) for t in [*(row_labels or []), *(column_labels or [])]):
        # the grid is still worth having; its labels are not what they say, so say so (one constant message: once)
        warnings.warn("grid labels with Devanagari vowel signs or conjuncts are drawn without text shaping (this Pillow "
                      "has no libraqm), so those marks sit after their letters; install a Pillow built with raqm (the "
                      "PyPI wheels include it: pip install --force-reinstall pillow)")
    mode = "RGB" if any(im.mode != "L" for im in images) or row_labels or column_labels else "L"
    width, height = images[0].width * scale, images[0].height * scale
    rows = (len(images) + columns - 1) // columns
    font = label_font(max(10, min(16, height // 2)))
    draw_probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left = max((draw_probe.textlength(t, font=font) for t in row_labels), default=0) + 8 if row_labels else 0
    top = (font.size + 8) if column_labels else 0
    sheet = Image.new(mode, (int(left) + columns * (width + padding) + padding,
                             top + rows * (height + padding) + padding), "white" if mode == "RGB" else 255)
    draw = ImageDraw.Draw(sheet)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        tile = image.convert(mode).resize((width, height), Image.Resampling.NEAREST)
        sheet.paste(tile, (int(left) + padding + c * (width + padding), top + padding + r * (height + padding)))
    for r, text in enumerate(row_labels or []):
        draw.text((4, top + padding + r * (height + padding) + height // 2), text, fill="black", font=font, anchor="lm")
    for c, text in enumerate(column_labels or []):
        draw.text((int(left) + padding + c * (width + padding) + width // 2, 4), text, fill="black", font=font, anchor="mt")
    return sheet


def save_image(image: Image.Image, path: str | Path) -> Path:
    """Save a PNG atomically (a half-written sample sheet is never left behind)."""
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    write_bytes(path, buffer.getvalue())
    return Path(path)


def to_pil(array: np.ndarray) -> Image.Image:
    """(H, W, 1 | 3) uint8 -> a PIL image ("L" for one channel)."""
    return Image.fromarray(array[..., 0], "L") if array.shape[-1] == 1 else Image.fromarray(array, "RGB")


def prompt_grid(images: list[Image.Image], prompts: list[str], per_prompt: int, scale: int = 2) -> Image.Image:
    """One labelled row per prompt: `images` are in prompt order, `per_prompt` each."""
    return make_grid(images, per_prompt, row_labels=prompts, scale=scale)
