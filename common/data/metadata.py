"""The `metadata.jsonl` source (Hugging Face imagefolder): free-form captions, one line per image."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from common.config import DataConfig
from common.data.listing import Listing, split_last
from common.errors import DatasetError


def list_metadata_jsonl(root: Path, config: DataConfig) -> Listing:
    """`metadata.jsonl` lines `{"file_name": "a.png", "text": "..."}` (text: a string or a list of them)."""
    path = root / "metadata.jsonl"
    if config.max_per_class > 0:
        raise DatasetError(f"data.max_per_class={config.max_per_class} needs a class dataset, but {path} has free "
                           f"captions and no classes; set data.max_per_class=0 (or keep fewer lines in the file)")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise DatasetError(f"{path} is not UTF-8 text (byte {error.start}); save it as UTF-8") from None
    root_resolved = root.resolve()
    sources, texts, first_line = [], [], {}
    for number, line in enumerate(lines, start=1):
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
        if not text or not all(t.strip() for t in text):  # "" is the unconditional prompt; [] crashes train-clip
            raise DatasetError(f"{path}: line {number}: 'text' of '{name}' is empty or holds an empty caption (got "
                               f"{row['text']!r}); an empty caption is the unconditional prompt, so the image would be "
                               f"trained with no caption at all. Write its caption, or delete the line")
        file = root / name
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
    labels = [-1] * len(sources)
    return Listing(sources, labels, split_last(labels, config.holdout_fraction), [], texts=texts,
                   identity="metadata:" + hashlib.sha256(path.read_bytes()).hexdigest()[:16])
