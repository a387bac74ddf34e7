"""The one prompt builder: caption templates formatted with a class's fields.

Every source owns its templates (`Listing.templates`); `data.captions` replaces them. Training's
captions, `encode-dataset`'s cache, the validation prompts, `evaluate` and the pipeline's class
table all come from `class_prompt`/`build_captions` here, so they cannot disagree on what a class
is called.
"""

from __future__ import annotations

from common.data.listing import Listing
from common.errors import DatasetError


def caption_templates(listing: Listing, configured: list[str]) -> list[str]:
    """The configured templates, or the source's own."""
    return list(configured) or listing.templates


def format_caption(template: str, fields: dict) -> str | None:
    """`template` with the class's fields, or None when it names a field the class lacks."""
    try:
        return template.format_map(fields)
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
    seen: dict[str, str] = {}  # a class's first caption, as the tokenizer reads it (lowercase) -> its key
    for image_class in listing.classes:
        ids = [add(text) for template in templates if (text := format_caption(template, image_class.fields)) is not None]
        if not ids:
            raise DatasetError(f"no caption template fits class '{image_class.key}' (fields: "
                               f"{sorted(image_class.fields)}); add a template such as '{{name}}' to data.captions")
        said = " ".join(captions[ids[0]].lower().split())
        if said in seen:  # two classes a prompt cannot tell apart would be merged silently
            raise DatasetError(f"classes '{seen[said]}' and '{image_class.key}' get the same caption ({captions[ids[0]]!r}, "
                               f"case and separators aside); rename one of the folders, or merge them")
        seen[said] = image_class.key
        per_class.append(ids)
    return captions, [per_class[label] for label in listing.labels]
