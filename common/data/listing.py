"""What a dataset is made of before any pixel is read: one entry per image, its class and its split."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from common.errors import DatasetError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


@dataclass(frozen=True)
class ImageClass:
    key: str  # the class as found in the data: a folder name, a file-name prefix, a digit
    fields: dict = field(default_factory=dict, hash=False)  # caption fields, e.g. {"name": "six", "symbol": "6"}


@dataclass
class Listing:
    """A source's images: one entry per image, plus the caption templates the source owns."""

    sources: list  # file paths, or row indices into `pixels`
    labels: list[int]  # class index, -1 for free-caption images
    holdout: list[bool]
    classes: list[ImageClass]
    templates: list[str] = field(default_factory=list)  # the source's caption templates ("Draw a {name}")
    texts: list[list[str]] | None = None  # free captions per image (metadata.jsonl)
    pixels: np.ndarray | None = None  # (N, H, W[, C]) uint8, for in-memory datasets
    identity: str = ""  # what the fingerprint hashes besides the config
    fonts: list[str] | None = None  # rendered sources: the font that drew each image
    # letters: renders of print fonts the model never sees, (pixels (N, H, W) uint8, labels (N,)), made on
    # demand: evaluate's classifier may learn them beside the held-out hand (evaluate.classifier_print_fonts)
    print_fonts: Callable[[], tuple[np.ndarray, np.ndarray]] | None = field(default=None, repr=False)
    fitted: dict = field(default_factory=dict, repr=False)  # in-memory pixels resized to (size, channels, fit)


def split_last(labels: list[int], fraction: float) -> list[bool]:
    """Held-out = the last `fraction` of each class, in listing order (floor, so tiny classes train)."""
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    holdout = [False] * len(labels)
    for members in by_class.values():
        for i in members[len(members) - int(len(members) * fraction):]:
            holdout[i] = True
    return holdout


def limit_per_class(listing: Listing, max_per_class: int) -> Listing:
    """The first `max_per_class` images of each class (all when 0)."""
    if max_per_class <= 0:
        return listing
    counts: dict[int, int] = {}
    keep = []
    for i, label in enumerate(listing.labels):
        counts[label] = counts.get(label, 0) + 1
        if counts[label] <= max_per_class:
            keep.append(i)
    pick = lambda values: [values[i] for i in keep]  # noqa: E731
    return Listing(pick(listing.sources), pick(listing.labels), pick(listing.holdout), listing.classes,
                   listing.templates, pick(listing.texts) if listing.texts is not None else None, listing.pixels,
                   listing.identity + f"|max_per_class={max_per_class}",
                   fonts=pick(listing.fonts) if listing.fonts is not None else None)


def images_in(folder: Path) -> list[Path]:
    """The image files of a folder. Hidden ones are not images of the dataset: macOS leaves a `._name.png` beside
    each image copied to another file system (its metadata, unreadable as an image), and in the class_index layout
    `.name_1.png` would even become a class of its own."""
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))


def check_distinct_files(sources: list[str], what: str = "image") -> None:
    """Refuse one file reached twice (through a link): it would be trained on twice, could land in training and in
    the held-out split, or in two classes at once."""
    first: dict[Path, str] = {}
    for source in sources:
        resolved = Path(source).resolve()
        if resolved in first:
            raise DatasetError(f"'{first[resolved]}' and '{source}' are the same {what} file ('{resolved}', reached "
                               f"through a link): it would count twice, possibly in two classes or in both splits; "
                               f"remove one of them, or copy the file if two entries are meant")
        first[resolved] = source
