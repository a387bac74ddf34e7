"""The run folder: one experiment, and at once a diffusers pipeline folder (see ARCHITECTURE.md)."""

from __future__ import annotations

import json
from pathlib import Path

import diffusers

from common.checkpoint import recover_directory, write_text
from common.config import Config, dump_config

PIPELINE_CLASS = "LatentPipeline"  # what `model_index.json` names; pipelines/ defines it


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

    def write_model_index(self, components: dict[str, tuple[str, str]], pipeline_config: dict) -> None:
        """`model_index.json` as diffusers' `save_pretrained` writes it: the pipeline class, each
        component's (library, class), and the pipeline's own config (e.g. the class table)."""
        index = {"_class_name": PIPELINE_CLASS, "_diffusers_version": diffusers.__version__,
                 **{name: list(spec) for name, spec in components.items()}, **pipeline_config}
        write_text(self.root / "model_index.json", json.dumps(index, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
