"""The registry of dataset sources: `data.name` picks a built-in one, `data.path` a folder layout."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from common.config import DataConfig
from common.data import devanagari, folders, letters, metadata, mnist
from common.data.listing import IMAGE_EXTENSIONS, Listing
from common.errors import DatasetError

BUILT_IN: dict[str, Callable[[DataConfig], Listing]] = {
    "mnist": mnist.list_mnist,
    "devanagari": devanagari.list_devanagari,
    "letters": letters.list_letters,
}


OTHER_METADATA = ("metadata.csv", "metadata.parquet", "metadata.json")


def folder_source(root: Path) -> Callable[[Path, DataConfig], Listing]:
    """The layout of a folder: metadata.jsonl, class sub-folders, or flat class_index files."""
    if (root / "metadata.jsonl").is_file():
        return metadata.list_metadata_jsonl
    for other in OTHER_METADATA:  # Hugging Face's imagefolder reads these too; here the captions would be lost
        if (root / other).is_file():
            raise DatasetError(f"'{root / other}' is not read: captions come from metadata.jsonl only (one "
                               f"{{\"file_name\": \"a.png\", \"text\": \"a red circle\"}} per line), and without it "
                               f"the folder would be read as classes named by folders or file names. Convert it to "
                               f"metadata.jsonl, or remove it if the classes are meant")
    # captions one or two folders down (Hugging Face's train/metadata.jsonl) would be ignored without a word: the
    # folder read as a class of a class dataset, or as holding no images
    nested = sorted((p for pattern in ("*/metadata.jsonl", "*/*/metadata.jsonl") for p in root.glob(pattern)
                     if not any(part.startswith(".") for part in p.relative_to(root).parts)),
                    key=lambda p: (p.relative_to(root).parts[0] not in folders.TRAIN_FOLDERS, p))  # train/ named first
    if nested:
        folder = nested[0].parent.relative_to(root).as_posix()
        raise DatasetError(f"'{nested[0]}' is not at the top of data.path '{root}', where metadata.jsonl is read, so its "
                           f"captions would be ignored{f' (and {len(nested) - 1} more like it)' if len(nested) > 1 else ''}. "
                           f"Point data.path at '{nested[0].parent}', or write one '{root / 'metadata.jsonl'}' whose "
                           f"file_name paths start with '{folder}/' (data.holdout_fraction sets the held-out share)")
    if any(p.is_dir() and not p.name.startswith(".") for p in root.iterdir()):
        return folders.list_class_folders
    return folders.list_class_index_files


def list_dataset(config: DataConfig) -> Listing:
    """Find the images of the configured dataset: classes, caption templates and the held-out split."""
    if config.name:
        if config.name not in BUILT_IN:
            raise DatasetError(f"unknown built-in dataset data.name='{config.name}'; use one of "
                               f"{', '.join(repr(n) for n in BUILT_IN)}, or set data.name='' and data.path to a folder")
        return BUILT_IN[config.name](config)
    root = Path(config.path).expanduser()
    if not root.exists():
        raise DatasetError(f"dataset folder '{root}' does not exist; check data.path")
    if not root.is_dir():
        raise DatasetError(f"data.path '{root}' is a file; point it at the folder that holds the images")
    listing = folder_source(root)(root, config)
    if not listing.sources:
        raise DatasetError(f"no images of a supported type ({', '.join(sorted(IMAGE_EXTENSIONS))}) in '{root}'")
    return listing
