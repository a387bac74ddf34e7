"""The `metadata.jsonl` source (Hugging Face imagefolder): free-form captions, one line per image."""

from __future__ import annotations

import hashlib
import json
import unicodedata
from pathlib import Path

from common.config import DataConfig
from common.data.listing import IMAGE_EXTENSIONS, Listing, split_last
from common.errors import DatasetError


class _RepeatedKey(ValueError):
    """A line giving 'file_name' or 'text' twice: JSON keeps the last one, and the other would be dropped unseen."""


def _once(pairs: list[tuple[str, object]]) -> dict:
    seen = set()
    for key, _ in pairs:
        if key in seen and key in ("file_name", "text"):
            raise _RepeatedKey(key)
        seen.add(key)
    return dict(pairs)


def list_metadata_jsonl(root: Path, config: DataConfig) -> Listing:
    """`metadata.jsonl` lines `{"file_name": "a.png", "text": "..."}` (text: a string or a list of them)."""
    path = root / "metadata.jsonl"
    if config.max_per_class > 0:
        raise DatasetError(f"data.max_per_class={config.max_per_class} needs a class dataset, but {path} has free "
                           f"captions and no classes; set data.max_per_class=0 (or keep fewer lines in the file)")
    try:
        # "\n" only: str.splitlines also breaks at U+2028, U+2029 and U+0085, which JSON allows raw inside a caption;
        # utf-8-sig: Windows editors (Notepad, Excel's "CSV UTF-8") start the file with a byte-order mark
        lines = path.read_text(encoding="utf-8-sig").split("\n")
    except UnicodeDecodeError as error:
        raise DatasetError(f"{path} is not UTF-8 text (byte {error.start}); save it as UTF-8") from None
    root_resolved = root.resolve()
    sources, texts, first_line = [], [], {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line, object_pairs_hook=_once)
        except _RepeatedKey as error:
            raise DatasetError(f"{path}: line {number} gives '{error}' twice, and JSON would keep only the last; write it "
                               f"once (several captions as a list: \"text\": [\"...\", \"...\"])") from None
        except json.JSONDecodeError as error:
            raise DatasetError(f"{path}: line {number} is not valid JSON ({error.msg}); fix or delete that line") from None
        if not isinstance(row, dict):  # e.g. the whole dataset as one JSON array (metadata.json's form)
            kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(row), "a number")
            raise DatasetError(f"{path}: line {number} is {kind}, not a JSON object; metadata.jsonl holds one object "
                               f"per line (JSON Lines), like {{\"file_name\": \"a.png\", \"text\": \"a red circle\"}}")
        if "file_name" not in row or "text" not in row:
            raise DatasetError(f"{path}: line {number} needs both 'file_name' and 'text' keys")
        name, text = row["file_name"], row["text"]
        text = [text] if isinstance(text, str) else text
        if not isinstance(name, str) or not isinstance(text, list) or not all(isinstance(t, str) for t in text):
            raise DatasetError(f"{path}: line {number}: 'file_name' must be a string and 'text' a string or list of strings")
        if not text or not all(t.strip() for t in text):  # "" is the unconditional prompt; [] crashes train-clip
            raise DatasetError(f"{path}: line {number}: 'text' of '{name}' is empty or holds an empty caption (got "
                               f"{row['text']!r}); an empty caption is the unconditional prompt, so the image would be "
                               f"trained with no caption at all. Write its caption, or delete the line")
        halves = [c for t in text for c in t if "\ud800" <= c <= "\udfff"]
        if halves:  # JSON's "\ud83d" escape without its partner: no character, and no UTF-8 tokenizer or file takes it
            raise DatasetError(f"{path}: line {number}: 'text' of '{name}' holds {ascii(halves[0])}, half of a UTF-16 "
                               f"surrogate pair with no partner, which is no character; write the character itself (or "
                               f"both halves of its escape), or delete it")
        if "\0" in name:  # no file system allows it, and resolving the path would fail with a bare ValueError
            raise DatasetError(f"{path}: line {number}: file_name {name!r} contains a NUL character (\\u0000), which no "
                               f"file name can hold; write the image's path relative to '{root}'")
        file = root / name
        if not file.exists():  # the name in one Unicode form (NFC 'é', as most editors write it) and the file saved in
            # the other (NFD, as macOS wrote names): the same name to the eye, another to the disk
            file = next((root / form for form in (unicodedata.normalize("NFC", name), unicodedata.normalize("NFD", name))
                         if (root / form).exists()), file)
        if Path(name).is_absolute() or not file.resolve().is_relative_to(root_resolved):
            raise DatasetError(f"{path}: line {number}: file_name '{name}' points outside the dataset folder; "
                               f"only paths inside '{root}' are read")
        if file.is_dir():  # "does not exist" would send one looking for a file that is there
            raise DatasetError(f"{path}: line {number}: '{name}' is a folder, not an image file; name the image in it")
        if not file.is_file():
            raise DatasetError(f"{path}: line {number}: file '{name}' does not exist")
        resolved = file.resolve()
        if resolved in first_line:  # the same image twice could land in training and in the held-out split
            raise DatasetError(f"{path}: lines {first_line[resolved]} and {number} name the same image ('{name}'); keep "
                               f"one line and give it all the captions as a list: \"text\": [\"...\", \"...\"]")
        first_line[resolved] = number
        sources.append(str(file))
        texts.append(text)
    if not sources:
        raise DatasetError(f"{path} lists no images; add lines like {{\"file_name\": \"a.png\", \"text\": \"a red circle\"}}")
    # as Hugging Face's imagefolder ("image at ... doesn't have metadata"): an image left out of the file would be
    # left out of training without a word (hidden files aside: macOS's ._name.png are no images)
    unlisted = [p.relative_to(root).as_posix() for p in sorted(root.rglob("*"))
                if p.suffix.lower() in IMAGE_EXTENSIONS and not any(part.startswith(".") for part in p.relative_to(root).parts)
                and p.is_file() and p.resolve() not in first_line]
    if unlisted:
        raise DatasetError(f"{len(unlisted)} image(s) in '{root}' have no line in {path}: {', '.join(unlisted[:5])}"
                           f"{' ...' if len(unlisted) > 5 else ''}; they would be left out of training. Add a line with "
                           f"the caption of each, or move them out of the folder")
    labels = [-1] * len(sources)
    return Listing(sources, labels, split_last(labels, config.holdout_fraction), [], texts=texts,
                   identity="metadata:" + hashlib.sha256(path.read_bytes()).hexdigest()[:16])
