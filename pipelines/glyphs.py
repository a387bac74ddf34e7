"""Writing text as a line of generated glyphs: which class draws each character, and the layout."""

from __future__ import annotations

import PIL.Image


def segment(classes: list[dict], text: str) -> list[int | None]:
    """Class indices for the characters of `text` (None for a space).

    `classes` is a run's class table (`{"key", "fields", "prompt"}` each). Accepts the classes'
    symbols ("2026", "कक्ष", conjuncts matched whole) or, separated by spaces, their romanized
    names ("ka kha ksha", "two zero").
    """
    if not classes:
        raise ValueError("this pipeline has no class table; write() needs a run trained on a class dataset of characters")
    names: dict[str, int] = {}
    for k, c in enumerate(classes):
        for field in ("name", "alias"):
            if c["fields"].get(field):
                names.setdefault(c["fields"][field].lower(), k)
    words = text.split()
    if words and all(w.lower() in names for w in words):
        return [names[w.lower()] for w in words]
    symbols = {c["fields"]["symbol"]: k for k, c in enumerate(classes) if c["fields"].get("symbol")}
    longest = max(map(len, symbols), default=1)
    glyphs: list[int | None] = []
    i = 0
    while i < len(text):
        if text[i].isspace():
            glyphs.append(None)
            i += 1
            continue
        match = next((text[i:i + n] for n in range(longest, 0, -1) if text[i:i + n] in symbols), None)
        if match is None:
            raise ValueError(f"no class draws {text[i]!r} (in {text!r}). Known characters: {' '.join(symbols)}; "
                             f"or write romanized names separated by spaces: {' '.join(sorted(names))}")
        glyphs.append(symbols[match])
        i += len(match)
    return glyphs


def lay_out_line(glyphs: list[int | None], images: list[PIL.Image.Image], size: int, gap: int = 0) -> PIL.Image.Image:
    """Paste one image per non-space glyph side by side in `size`-pixel cells, `gap` pixels apart."""
    mode = images[0].mode if images else "L"
    line = PIL.Image.new(mode, (len(glyphs) * size + (len(glyphs) - 1) * gap, size), 0)
    drawn = iter(images)
    for position, k in enumerate(glyphs):
        if k is not None:
            line.paste(next(drawn), (position * (size + gap), 0))
    return line
