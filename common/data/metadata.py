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
    return Listing(sources, labels, split_last(labels, config.holdout_fraction), [], texts=texts,
                   identity="metadata:" + hashlib.sha256(path.read_bytes()).hexdigest()[:16])
