"""Folder sources: one sub-folder per class (also `Train/` + `Test/`), or flat `class_index.jpg` files."""

from __future__ import annotations

import re
from pathlib import Path

from common.config import DataConfig
from common.data import devanagari
from common.data.listing import (IMAGE_EXTENSIONS, ImageClass, Listing, check_distinct_files, images_in,
                                 limit_per_class, split_last)
from common.errors import DatasetError

HOLDOUT_FOLDERS = {"test", "val", "valid", "validation"}
TRAIN_FOLDERS = {"train", "training"}
CAPTIONS = ["{name}", "Draw a {name}", "a picture of {name}", "an image of a {name}"]


def class_fields(key: str) -> dict:
    """Caption fields for a class folder: its name with separators as spaces, or the Devanagari
    dataset's fields for its folder names (character_1_ka, digit_3)."""
    known = devanagari.class_fields(key)
    return known if known is not None else {"name": re.sub(r"[_\-]+", " ", key).strip()}


def check_class_name(key: str, where: Path) -> str:
    """A class name becomes captions, labels and JSON: refuse control characters (a newline in a folder name) and a
    name of separators alone (`___`, or `_0001.jpg` in the class_index layout)."""
    if not key.isprintable():
        raise DatasetError(f"class name {key!r} in '{where}' contains a control character (e.g. a newline); rename it")
    if not class_fields(key)["name"]:  # "{name}" would caption its images "", the unconditional prompt
        raise DatasetError(f"class name {key!r} in '{where}' is empty once '_' and '-' are read as spaces, so its "
                           f"caption would be the empty prompt (no condition); rename the folder (or the files, in the "
                           f"class_index layout) to what its images show")
    return key


def templates_for(classes: list[ImageClass]) -> list[str]:
    """The Devanagari dataset's folders get its templates, like the built-in source; others the generic ones."""
    return devanagari.CAPTIONS if classes and all("kind" in c.fields for c in classes) else CAPTIONS


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def check_no_loose_images(folder: Path) -> None:
    """Refuse image files beside class (or split) sub-folders: only the sub-folders are read, so those files would
    be left out without a word, all of a class_index dataset (tulips_0001.jpg) when one sub-folder is added."""
    loose = [p.name for p in images_in(folder)]
    few = lambda names: ", ".join(names[:3]) + (" ..." if len(names) > 3 else "")  # noqa: E731
    if loose and not _subfolders(folder):  # a train/ or test/ folder of files (Hugging Face's split folders)
        raise DatasetError(f"'{folder}' is a split folder but holds {len(loose)} image file(s) directly "
                           f"({few(loose)}), which would not be read: a split folder holds one sub-folder per class. "
                           f"Move the images into class folders in it, or set data.path to '{folder}' if it is a "
                           f"dataset of its own")
    if loose:
        raise DatasetError(f"'{folder}' has sub-folders ({few([p.name for p in _subfolders(folder)])}) and also "
                           f"{len(loose)} image file(s) directly in it ({few(loose)}), which would not be read: only "
                           f"the sub-folders are read (one per class, or train/ and test/ ones). Move the images into "
                           f"their class folders, or the sub-folders out if the files are the dataset (the class_index "
                           f"layout: tulips_0001.jpg)")


def list_class_folders(root: Path, config: DataConfig) -> Listing:
    """`root/<class>/*.png`, or `root/Train/<class>/*` + `root/Test/<class>/*` (Test is held out)."""
    split_dirs = {p.name.lower(): p for p in _subfolders(root)}
    train_dirs = [p for name, p in split_dirs.items() if name in TRAIN_FOLDERS]
    test_dirs = [p for name, p in split_dirs.items() if name in HOLDOUT_FOLDERS]
    if test_dirs and not train_dirs:  # ImageFolder would make 'test' a class of held-out images: surely not meant
        raise DatasetError(f"'{test_dirs[0]}' is named like a held-out split, but '{root}' has no train/ folder beside "
                           f"it, so it would be read as a class called '{test_dirs[0].name}'. Put the training class "
                           f"folders in '{root / 'train'}' (with the held-out ones in '{test_dirs[0]}'), or rename "
                           f"the folder if '{test_dirs[0].name}' really is a class")
    trained = {c.name for d in train_dirs for c in _subfolders(d)}
    for test_dir in test_dirs:
        for class_dir in _subfolders(test_dir):
            if class_dir.name not in trained:  # in the class table and evaluated, but never trained on
                raise DatasetError(f"held-out class folder '{class_dir}' has no training folder (no '{class_dir.name}' "
                                   f"in {' or '.join(repr(str(d)) for d in train_dirs)}), so the model would never "
                                   f"learn class '{class_dir.name}'; add its training images there, or remove the "
                                   f"held-out folder")
    groups = [(d, False) for d in train_dirs] + [(d, True) for d in test_dirs] if train_dirs else [(root, None)]
    for folder in dict.fromkeys([root, *(group for group, _ in groups)]):
        check_no_loose_images(folder)
    for other in _subfolders(root) if train_dirs else []:  # a class folder beside train/ would never be read
        if other not in train_dirs + test_dirs and (images_in(other) or any(images_in(d) for d in _subfolders(other))):
            raise DatasetError(f"'{other}' holds images but would not be read: beside '{train_dirs[0]}' only split "
                               f"folders ({', '.join(sorted(TRAIN_FOLDERS | HOLDOUT_FOLDERS))}) are read. Move it into "
                               f"'{train_dirs[0]}' if it is a class (or its class folders, if it holds them), or move "
                               f"it out of '{root}'")
    keys = sorted({c.name for group, _ in groups for c in _subfolders(group)})
    classes = [ImageClass(check_class_name(key, root), class_fields(key)) for key in keys]
    index = {key: i for i, key in enumerate(keys)}
    sources, labels, holdout = [], [], []
    for group, is_holdout in groups:
        for class_dir in _subfolders(group):
            nested = [d.name for d in _subfolders(class_dir) if images_in(d)]
            if nested:  # only a class folder's own files are its images
                raise DatasetError(f"class folder '{class_dir}' has sub-folders of images ({', '.join(nested[:3])}"
                                   f"{' ...' if len(nested) > 3 else ''}), which would not be read: a class's images "
                                   f"are the files directly in its folder. Move them up into '{class_dir}', or make "
                                   f"each sub-folder a class folder of its own")
            files = images_in(class_dir)
            if not files and is_holdout is not True:
                raise DatasetError(f"class folder '{class_dir}' has no images ({', '.join(sorted(IMAGE_EXTENSIONS))}); "
                                   f"add images or remove the folder")
            sources += [str(f) for f in files]
            labels += [index[class_dir.name]] * len(files)
            holdout += [bool(is_holdout)] * len(files)
    folders: dict[Path, Path] = {}
    for group, _ in groups:  # a linked class folder is the same images under a second class name
        for class_dir in _subfolders(group):
            same = folders.setdefault(class_dir.resolve(), class_dir)
            if same != class_dir:
                raise DatasetError(f"class folders '{same}' and '{class_dir}' are the same folder (one links to the other): "
                                   f"its images would be two classes at once; remove the link, or copy the images if "
                                   f"two classes are meant")
    check_distinct_files(sources)
    listing = Listing(sources, labels, holdout, classes, templates_for(classes), identity="classfolders")
    listing = limit_per_class(listing, config.max_per_class)
    if not test_dirs:
        listing.holdout = split_last(listing.labels, config.holdout_fraction)
    return listing


def list_class_index_files(root: Path, config: DataConfig) -> Listing:
    """A flat folder of `<class>_<index>.jpg` files, e.g. `tulips_00012.jpg` (the flowers layout)."""
    files = images_in(root)
    keys = []
    for f in files:
        if "_" not in f.stem:
            raise DatasetError(f"'{f.name}' does not follow the class_index layout (e.g. tulips_0001.jpg); "
                               f"rename it, or put images in one sub-folder per class")
        keys.append(f.stem.rsplit("_", 1)[0])
    names = sorted(set(keys))
    classes = [ImageClass(check_class_name(key, root), class_fields(key)) for key in names]
    index = {key: i for i, key in enumerate(names)}
    check_distinct_files([str(f) for f in files])
    order = sorted(range(len(files)), key=lambda i: (index[keys[i]], files[i].name))
    listing = Listing([str(files[i]) for i in order], [index[keys[i]] for i in order], [False] * len(files),
                      classes, templates_for(classes), identity="classindex")
    listing = limit_per_class(listing, config.max_per_class)
    listing.holdout = split_last(listing.labels, config.holdout_fraction)
    return listing
