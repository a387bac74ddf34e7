"""The one prompt builder: caption templates formatted with a class's fields.

Every source owns its templates (`Listing.templates`); `data.captions` replaces them. Training's
captions, `encode-dataset`'s cache, the validation prompts, `evaluate` and the pipeline's class
table all come from `class_prompt`/`build_captions` here, so they cannot disagree on what a class
is called.
"""

from __future__ import annotations

import math
import re
import unicodedata

import torch

from common.data.listing import Listing
from common.errors import DatasetError


def caption_templates(listing: Listing, configured: list[str]) -> list[str]:
    """The configured templates, or the source's own."""
    return list(configured) or listing.templates


# "a {field}" in a template: the article is chosen by the value ("Draw a six", "Draw an eight")
ARTICLE_BEFORE_FIELD = re.compile(r"\b([Aa])n? (\{(\w+)\})")


def indefinite_article(word: str) -> str:
    """'an' before a vowel sound as English spells it for class names and numerals, else 'a'.

    Covers the usual cases (an apple, an umbrella, an eight, an 8, an 11; a one, a unicorn, a 1); names
    outside them can be written with their article in a template of their own."""
    word = word.strip().lower()
    if re.match(r"(8|11|18)(\D|$)|8\d", word) and not re.match(r"\d{4}", word):
        return "an"  # eight, eleven, eighteen, eighty-...; a year like 1800 is read "eighteen hundred" too, rarely a class
    if word.startswith(("one", "once", "uni", "use", "usu", "ura", "ure", "uri", "uro", "ut", "eu", "ewe")):
        return "a"
    return "an" if word[:1] in ("a", "e", "i", "o", "u") or word.startswith(("hour", "honest", "heir")) else "a"


def format_caption(template: str, fields: dict) -> str | None:
    """`template` with the class's fields, or None when it names a field the class lacks.

    An "a" (or "an") right before a field agrees with the field's value: "Draw a {name}" gives
    "Draw a six" and "Draw an eight"."""
    def agree(match: re.Match) -> str:
        value = fields.get(match.group(3))
        if value is None:
            return match.group(0)
        article = indefinite_article(str(value))
        return (article.capitalize() if match.group(1) == "A" else article) + " " + match.group(2)

    try:
        return ARTICLE_BEFORE_FIELD.sub(agree, template).format_map(fields)
    except (KeyError, IndexError):
        return None


def class_prompt(fields: dict, templates: list[str]) -> str | None:
    """A class's prompt: the first template that fits it (what `generate --all-classes` and `evaluate` draw)."""
    return next((text for template in templates if (text := format_caption(template, fields)) is not None), None)


def build_captions(listing: Listing, templates: list[str]) -> tuple[list[str], list[list[int]]]:
    """Distinct caption strings and, per image, the indices of its captions."""
    captions: list[str] = []
    index: dict[str, int] = {}

    def add(text: str) -> int:
        if text not in index:
            index[text] = len(captions)
            captions.append(text)
        return index[text]

    if listing.texts is not None:
        return captions, [[add(t) for t in texts] for texts in listing.texts]
    per_class = []
    # a class's first caption as a CLIP tokenizer reads it (Unicode NFC, lowercase) -> its key; the tokenizer's own
    # reading, truncation included, is checked once it exists (ldm/text.py check_classes_read_apart)
    seen: dict[str, str] = {}
    for image_class in listing.classes:
        ids = [add(text) for template in templates if (text := format_caption(template, image_class.fields)) is not None]
        if not ids:
            raise DatasetError(f"no caption template fits class '{image_class.key}' (fields: "
                               f"{sorted(image_class.fields)}); add a template such as '{{name}}' to data.captions")
        said = " ".join(unicodedata.normalize("NFC", captions[ids[0]]).lower().split())
        if said in seen:  # two classes a prompt cannot tell apart would be merged silently
            first, key = seen[said], image_class.key
            shown = ascii if unicodedata.normalize("NFC", first) == unicodedata.normalize("NFC", key) else repr  # café, café
            raise DatasetError(f"classes {shown(first)} and {shown(key)} get the same caption "
                               f"({captions[ids[0]]!r}, case, separators and Unicode normalisation aside); rename one "
                               f"of the folders, or merge them")
        seen[said] = image_class.key
        per_class.append(ids)
    return captions, [per_class[label] for label in listing.labels]


def caption_table(caption_ids: list[list[int]], width: int | None = None) -> torch.Tensor:
    """Each image's caption indices as one (N, K) int64 table, -1 padded (K: the most any image has, or `width`)."""
    table = torch.full((len(caption_ids), width or max(map(len, caption_ids), default=1)), -1, dtype=torch.long)
    for row, ids in enumerate(caption_ids):
        table[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    return table


class CaptionDraw:
    """One of each image's captions, chosen uniformly, for a batch of rows: one kernel on the device, no Python per image.

    A single draw in [0, R) taken modulo an image's caption count is uniform whenever the count divides R, so R is
    the least common multiple of the counts (capped at 2**62, where the modulo's bias is below 2**-50). On the CPU
    it is also, number for number, the draw `torch.randint(count, ())` made image after image."""

    def __init__(self, caption_ids: list[list[int]], device: torch.device | str):
        self.table = caption_table(caption_ids).to(device)  # (N, K)
        self.counts = (self.table >= 0).sum(1)  # (N,)
        self.draw_range = min(math.lcm(*{len(ids) for ids in caption_ids}), 2**62)

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        """Caption indices (B,) for the images `rows` (B,) on the table's device, from torch's default generator there."""
        draws = torch.randint(self.draw_range, rows.shape, device=rows.device)
        return self.table[rows, draws % self.counts[rows]]
