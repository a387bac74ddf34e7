"""The run folder: one experiment, and at once a diffusers pipeline folder (see ARCHITECTURE.md)."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

import diffusers

from common.checkpoint import recover_directory, write_text
from common.config import Config, dump_config
from common.errors import RunFolderError

PIPELINE_CLASS = "LatentPipeline"  # what `model_index.json` names; pipelines/ defines it
# the command that writes each model folder of a run (train-ldm also copies a text_encoder.pretrained CLIP in)
WRITTEN_BY = {"vae": "train-vae", "text_encoder": "train-clip", "unet": "train-ldm"}


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

    def update_model_index(self, **pipeline_config) -> None:
        """Change entries of the pipeline's config in `model_index.json` (e.g. tuned sampling defaults)."""
        index = {**self.model_index(), **pipeline_config}
        write_text(self.root / "model_index.json", json.dumps(index, indent=2, sort_keys=True, ensure_ascii=False) + "\n")

    def model_index(self, components: tuple[str, ...] = ()) -> dict:
        """`model_index.json`, refused with the fix unless it is a pipeline index naming each of `components`
        (diffusers would stop on a damaged one with a bare KeyError or TypeError)."""
        path = self.root / "model_index.json"
        fix = "re-run `train-ldm --config ...` (it writes this file), or restore it from a copy of the run"
        try:
            index = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise RunFolderError(f"{path} is not valid JSON ({error}); {fix}") from None
        if not isinstance(index, dict) or "_class_name" not in index:
            raise RunFolderError(f"{path} is not a pipeline index (it has no \"_class_name\"); {fix}")
        missing = [name for name in components if name not in index]
        if missing:
            raise RunFolderError(f"{path} names no {', '.join(missing)} component{'s' * (len(missing) > 1)}; {fix}")
        return index


class RunLock:
    """An exclusive lock on one stage of a run folder (`run/.lock-<stage>`), held while the stage writes.

    A second command on the same stage and folder stops at once with the holder's command line, process
    id and host instead of interleaving its checkpoints with the first one's. The operating system
    releases the lock when the holder exits in any way (kill -9 included), so it never goes stale.
    """

    def __init__(self, root: str | Path, stage: str):
        self.path = Path(root) / f".lock-{stage}"
        self.stage = stage
        self._file = None

    def __enter__(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        file = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = file.read().strip() or "another process"
            file.close()
            raise RunFolderError(f"{self.path.parent} is in use: its {self.stage} stage is being written by {holder}. "
                                 f"Wait for that command to finish (or stop it), or use another run_dir") from None
        file.seek(0)
        file.truncate()
        file.write(f"`{' '.join(Path(sys.argv[0]).name if i == 0 else a for i, a in enumerate(sys.argv))}` "
                   f"(pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')})")
        file.flush()
        self._file = file
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
