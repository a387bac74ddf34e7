"""`ImageDataset`: one split of any source, as tensors with labels and captions.

An item is `{"pixel_values": (C, H, W) float in [-1, 1], "label": int, "index": int}`, un-augmented
(training loops augment whole batches on the device). Captions come from the source's templates
(or `data.captions`) through the one prompt builder in `captions.py`; `metadata.jsonl` sources
carry free text per image. The held-out split is never trained on.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile

from common.config import DataConfig
from common.data.captions import build_captions, caption_templates, class_prompt
from common.data.listing import Listing
from common.data.pixels import fitted_arrays, load_image, to_tensor
from common.data.sources import list_dataset
from common.errors import DatasetError

SPLITS = ("train", "holdout", "all")


class ImageDataset(torch.utils.data.Dataset):
    """Images of one split (`train`, `holdout` or `all`) with labels and captions."""

    def __init__(self, config: DataConfig, split: str = "train", listing: Listing | None = None):
        if split not in SPLITS:
            raise ValueError(f"split must be train, holdout or all, got {split!r}")
        self.config = config
        self.split = split
        self.listing = listing if listing is not None else list_dataset(config)
        self.classes = self.listing.classes
        self.templates = caption_templates(self.listing, config.captions)
        self.captions, caption_ids = build_captions(self.listing, self.templates)
        self.rows = [i for i, held_out in enumerate(self.listing.holdout)
                     if split == "all" or held_out == (split == "holdout")]
        self.labels = [self.listing.labels[i] for i in self.rows]
        self.caption_ids = [caption_ids[i] for i in self.rows]
        self.holdout = [self.listing.holdout[i] for i in self.rows]
        self.bad_images: list[str] = []

    def __len__(self) -> int:
        return len(self.rows)

    def class_prompts(self) -> list[str]:
        """One prompt per class, in class order: what validation grids, `evaluate` and `write()` draw."""
        return [class_prompt(c.fields, self.templates) for c in self.classes]

    def pixels(self, i: int) -> np.ndarray:
        """Image `i` as (H, W, C) uint8 at the configured size, before augmentation."""
        source = self.listing.sources[self.rows[i]]
        c = self.config
        if self.listing.pixels is not None:
            return self._fitted_in_memory()[source]
        return load_image(source, c.image_size, c.channels, c.fit)

    def _fitted_in_memory(self) -> np.ndarray:
        """In-memory datasets are converted and resized once, not once per epoch: (N, H, W, C) uint8."""
        c = self.config
        key = (c.image_size, c.channels, c.fit)
        if key not in self.listing.fitted:  # shared by the splits made from one listing
            self.listing.fitted[key] = fitted_arrays(self.listing.pixels, c.image_size, c.channels, c.fit)
        return self.listing.fitted[key]

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": to_tensor(self.pixels(i)), "label": self.labels[i], "index": i}

    def fingerprint(self) -> str:
        """Changes when the images, their classes/captions or the preprocessing change."""
        h = hashlib.sha256()
        c = self.config
        h.update(json.dumps([c.name, c.image_size, c.channels, c.fit, c.holdout_fraction, c.max_per_class,
                             c.per_class, self.captions, self.listing.identity]).encode())
        if self.listing.pixels is None:  # the files' content: a swapped image with its old size and mtime counts
            h.update(b"files read upright (EXIF Orientation applied)\n")  # caches from before read photos sideways
            for source in self.listing.sources:
                try:
                    with open(source, "rb") as f:
                        digest = hashlib.blake2b(f.read(), digest_size=16).hexdigest()
                except OSError as error:  # no permission: the scan left it out; made readable, it changes the key
                    digest = f"unreadable: {type(error).__name__}"
                # the name as the file system has it: os.fsencode takes a name that is not UTF-8 (a Latin-1 'café'
                # from an old archive) back to its bytes, where str.encode refused it
                h.update(os.fsencode(source) + f"|{digest}\n".encode())
        return h.hexdigest()


def scan_images(dataset: ImageDataset, on_bad_image: str) -> ImageDataset:
    """Decode every file once; drop (with a warning) or refuse the ones that fail, before any epoch starts."""
    if dataset.listing.pixels is not None:
        return dataset
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    bad, untrained = [], []  # untrained: (label, file) of the dropped files that were to be trained on
    for i in range(len(dataset)):
        try:
            dataset.pixels(i)
        except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as error:
            bad.append((i, dataset.listing.sources[dataset.rows[i]], error))
    if bad and on_bad_image == "error":
        names = "; ".join(f"{Path(s).name} ({e})" for _, s, e in bad[:5])
        raise DatasetError(f"{len(bad)} image(s) cannot be read: {names}. Fix or remove them, or set "
                           f"data.on_bad_image=skip to train without them")
    if bad:
        names = ", ".join(Path(s).name for _, s, _ in bad[:5])
        warnings.warn(f"skipping {len(bad)} unreadable image(s): {names}{' ...' if len(bad) > 5 else ''}")
        untrained = [(dataset.labels[i], s) for i, s, _ in bad if not dataset.holdout[i]]
        dropped = {i for i, _, _ in bad}
        keep = [i for i in range(len(dataset)) if i not in dropped]
        dataset.rows = [dataset.rows[i] for i in keep]
        dataset.labels = [dataset.labels[i] for i in keep]
        dataset.caption_ids = [dataset.caption_ids[i] for i in keep]
        dataset.holdout = [dataset.holdout[i] for i in keep]
        dataset.bad_images = [s for _, s, _ in bad]
    if len(dataset) == 0:
        chosen = " (which files are held out is decided before any is read)" if dataset.split == "holdout" else ""
        raise DatasetError(f"no readable images are left in the '{dataset.split}' split: all {len(bad)} of its files "
                           f"are unreadable ({in_class_folders([s for _, s, _ in bad])}){chosen}; fix or replace them")
    if dataset.split != "holdout":
        check_every_class_trains(dataset, untrained)
    return dataset


def in_class_folders(paths: list[str], limit: int = 5) -> str:
    """'dog/0.png, dog/1.png ...': file names with their folder, which is their class in a folder dataset."""
    return ", ".join(f"{Path(s).parent.name}/{Path(s).name}" for s in paths[:limit]) + (" ..." if len(paths) > limit else "")


def check_every_class_trains(dataset: ImageDataset, untrained: list[tuple[int, str]]) -> None:
    """Refuse a class left with no readable training image: it would stay in the class table, be drawn and
    evaluated, while the model never saw it. `untrained`: (label, file) of the training files dropped."""
    trained = {label for label, held_out in zip(dataset.labels, dataset.holdout) if not held_out}
    for label, image_class in enumerate(dataset.classes):
        if label in trained:
            continue
        lost = [s for lost_label, s in untrained if lost_label == label]
        why = (f"all {len(lost)} of its training files in '{Path(lost[0]).parent}' are unreadable "
               f"({in_class_folders(lost)}); fix or replace them, or remove the class folder" if lost else
               "add training images for it, or remove it")
        raise DatasetError(f"class '{image_class.key}' has no readable training image: {why}")


def load_split(config: DataConfig, split: str, listing: Listing | None = None) -> ImageDataset:
    """The dataset of one split, with unreadable files handled as `data.on_bad_image` says."""
    dataset = ImageDataset(config, split, listing=listing)
    if len(dataset) == 0:
        raise DatasetError(f"the '{split}' split of the dataset is empty; add images or change data.holdout_fraction")
    return scan_images(dataset, config.on_bad_image)


def load_train_and_holdout(config: DataConfig) -> tuple[ImageDataset, ImageDataset]:
    """The training split and the held-out split, listed once."""
    train_set = load_split(config, "train")
    return train_set, load_split(config, "holdout", listing=train_set.listing)
