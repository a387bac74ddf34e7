"""The run folder: one experiment, and at once a diffusers pipeline folder (see ARCHITECTURE.md)."""

from __future__ import annotations

from pathlib import Path

from common.checkpoint import recover_directory, write_text
from common.config import Config, dump_config


class RunFolder:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def component(self, name: str) -> Path:
        """`vae`, `text_encoder`, `tokenizer`, `unet`, `scheduler`: a diffusers/transformers folder."""
        path = self.root / name
        recover_directory(path)
        return path

    @property
    def latents(self) -> Path:
        return self.root / "latents"

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def train_state(self, stage: str) -> Path:
        return self.root / "train_state" / stage

    def save_config(self, config: Config) -> None:
        write_text(self.root / "config.yaml", dump_config(config))
