"""The run folder: one experiment, and at once a diffusers pipeline folder (see ARCHITECTURE.md)."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import diffusers
import yaml

from common.checkpoint import header_digest, recover_directory, writable_folder, write_text
from common.config import Config, dump_config, to_dict
from common.errors import RunFolderError

PIPELINE_CLASS = "LatentPipeline"  # what `model_index.json` names; pipelines/ defines it
# the command that writes each model folder of a run (train-ldm also copies a text_encoder.pretrained CLIP in)
WRITTEN_BY = {"vae": "train-vae", "text_encoder": "train-clip", "unet": "train-ldm"}
# the file each pipeline component folder cannot load without (the tokenizer is checked by ldm.text.check_tokenizer)
COMPONENT_CONFIGS = {"vae": "config.json", "text_encoder": "config.json", "unet": "config.json",
                     "scheduler": "scheduler_config.json"}
STAGE_OUTPUTS = {"vae": "vae", "clip": "clip", "encode": "latents", "ldm": "unet"}  # what each stage writes
# in a model folder a stage exports: the resume state it was exported from (see Trainer.stamp, RunFolder.check_finished)
TRAINED_AT = "trained_at.json"

# What each stage's command trains with; the rest of a run's config.yaml is what its other stages were
# trained with. `seed` and `data` shape every stage, so one run folder has one of each.
STAGE_SECTIONS = {"vae": ("vae",), "clip": ("clip",), "encode": ("encode",), "ldm": ("ldm", "text_encoder", "sample")}
SHARED_KEYS = ("seed", "data")
# Keys that decide what is logged, saved or previewed, or how fast: never the weights
UNSHAPING_KEYS = frozenset({"save_every", "sample_every", "log_every", "keep_checkpoints", "max_bad_steps", "report_to",
                            "compile", "validation_prompts", "num_workers"})


def shaping_settings(tree: dict, sections: tuple[str, ...]) -> dict[str, Any]:
    """The dotted keys and values of `sections` of a config dict (`to_dict`) that shape trained weights."""
    flat: dict[str, Any] = {}

    def walk(node: Any, key: str) -> None:
        if isinstance(node, dict):
            for name, value in node.items():
                if name not in UNSHAPING_KEYS:
                    walk(value, f"{key}.{name}")
        else:
            flat[key] = node

    for section in sections:
        if section in tree:
            walk(tree[section], section)
    return flat


def settings_changes(before: dict, after: dict, limit: int = 6) -> list[str]:
    """'key: before -> after' for each key whose value differs between two `shaping_settings` (at most `limit`).
    A key only one side has is not compared: a config saved by an older version lacks the keys added since."""
    keys = [k for k in sorted(before.keys() & after.keys()) if before[k] != after[k]]
    shown = [f"{k}: {before[k]!r} -> {after[k]!r}" for k in keys[:limit]]
    return shown + ([f"and {len(keys) - limit} more"] if len(keys) > limit else [])


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

    def state_files(self, stage: str) -> list[Path]:
        """`stage`'s resume states, newest first; none where it has saved none."""
        return sorted(self.train_state(stage).glob("state-*.safetensors"), reverse=True)

    def check_writable(self, stage: str, *folders: Path) -> None:
        """Refuse, before anything is written, a file where a folder of the run that `stage` writes into goes:
        it would otherwise stop the stage part-way (at its first log line, checkpoint, shard or sample grid)."""
        for folder in folders:
            writable_folder(folder, f"the {stage} stage's folder", "move it out of the way, or choose another run_dir")

    def stages_present(self) -> list[str]:
        """The stages that have written something into this folder (their model, cache or resume state)."""
        return [stage for stage, output in STAGE_OUTPUTS.items()
                if (self.root / output).exists() or self.train_state(stage).is_dir()]

    def saved_config(self) -> dict | None:
        """`config.yaml` as a dict, or None where there is none (a new folder)."""
        path = self.root / "config.yaml"
        if not path.is_file():
            return None
        try:
            saved = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as error:
            raise RunFolderError(f"{path} is not readable YAML ({str(error).splitlines()[0]}); it records what this run's "
                                 f"stages were trained with. Restore it, or use a new run_dir") from None
        return saved if isinstance(saved, dict) else None

    def check_shared_settings(self, config: Config, stage: str, keys: tuple[str, ...] = SHARED_KEYS,
                              ignore: tuple[str, ...] = ()) -> None:
        """Refuse a command whose seed or data settings (`keys`, less the dotted keys starting with `ignore`) differ
        from those the folder's other stages were trained with: config.yaml holds one of each, so it could no
        longer reproduce every stage."""
        others = [s for s in self.stages_present() if s != stage]
        saved = self.saved_config() if others else None
        if not saved:
            return
        before, after = ({k: v for k, v in shaping_settings(tree, keys).items() if not k.startswith(ignore)}
                         for tree in (saved, to_dict(config)))
        changes = settings_changes(before, after)
        if changes:
            raise RunFolderError(
                f"{self.root} holds the {', '.join(others)} stage(s), trained with other settings than this {stage} "
                f"command's ({'; '.join(changes)}; from {self.root / 'config.yaml'} to this command's). One run folder has one "
                f"seed and one dataset, so that its config.yaml reproduces every stage: drop those overrides (or pass "
                f"--config {self.root / 'config.yaml'}), or use a new run_dir")

    def stamp(self, folder: Path, stage: str, step: int) -> None:
        """Record in a model folder `stage` exports (before it is swapped into place) the resume state it comes from,
        so that later stages can tell it from a stage started again since (check_finished)."""
        for newest in self.state_files(stage)[:1]:  # none if every save failed
            write_text(folder / TRAINED_AT, json.dumps({"step": step, "state": header_digest(newest)}))

    def check_finished(self, stage: str, component: str) -> None:
        """Refuse to build on `component` (a model folder `stage` exports) while the stage's newest resume state is
        not the one it was exported from: the stage was started again (e.g. retrained with other settings) and
        stopped, so the folder holds the old model while config.yaml describes the new one. Folders written
        before this record, and runs without resume states, are not checked."""
        marker = self.root / component / TRAINED_AT
        states = self.state_files(stage)
        if not marker.is_file() or not states:
            return
        recorded = json.loads(marker.read_text(encoding="utf-8"))
        if header_digest(states[0]) != recorded.get("state"):
            command = {"vae": "train-vae", "clip": "train-clip", "ldm": "train-ldm"}[stage]
            raise RunFolderError(f"{command} is unfinished in {self.root}: {states[0]} is newer than the {component}/ it "
                                 f"wrote (at step {recorded.get('step')}), so {component}/ is not the model config.yaml "
                                 f"describes. Re-run `{command} --config ...` to finish it first")

    def check_resumable(self, stage: str, saved: dict | None, config: Config, checkpoint: Path, step: int) -> None:
        """Refuse to resume a checkpoint trained with other settings (`saved`, its config as a dict; None in
        checkpoints older than that record): the finished model would match neither them nor config.yaml.
        Logging and saving keys may change (UNSHAPING_KEYS)."""
        if saved is None:
            return
        sections = SHARED_KEYS + (stage,)
        changes = settings_changes(shaping_settings(saved, sections), shaping_settings(to_dict(config), sections))
        if not changes:
            return
        steps = any(c.startswith((f"{stage}.max_steps:", f"{stage}.epochs:")) for c in changes)
        raise RunFolderError(
            f"the {stage} checkpoint {checkpoint.name} (step {step}) was trained with other settings than this command's "
            f"({'; '.join(changes)}). Resuming would give a model that no config reproduces. Run the stage with the "
            f"checkpoint's settings (they are in {self.root / 'config.yaml'}), delete {self.train_state(stage)} to train "
            f"it again, or use a new run_dir"
            + (f" (the learning rate's cosine follows {stage}.max_steps; to train these weights further, start a new run "
               f"with {stage}.init_from={self.root})" if steps else ""))

    def save_config(self, config: Config, stage: str) -> list[str]:
        """Write `config.yaml`: `stage`'s own sections (STAGE_SECTIONS) and the shared keys from `config`; the
        sections of the other stages already in the folder stay as those stages were trained. Returns the
        settings of `config` that were not saved for that reason, as notes for the caller to print."""
        tree, saved = to_dict(config), self.saved_config()
        kept: list[str] = []
        for other in self.stages_present() if saved else []:
            for section in STAGE_SECTIONS[other] if other != stage else ():
                if section in saved:
                    kept += [f"not used by this stage, and not saved: {change} (config.yaml keeps the value the run's "
                             f"own {other} stage was trained with)"
                             for change in settings_changes(shaping_settings(saved, (section,)), shaping_settings(tree, (section,)))]
                    tree[section] = saved[section]
        write_text(self.root / "config.yaml", dump_config(tree))
        return kept

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

    def check_loadable(self, components: tuple[str, ...]) -> None:
        """Refuse a path that is not a finished run folder, one whose `model_index.json` is damaged or does not name
        each of `components`, or one whose component folders lack the file they load from, naming it and the command
        that writes it (diffusers would name the run folder itself as missing a config.json)."""
        if self.root.is_file():
            raise RunFolderError(f"'{self.root}' is a file, not a run folder; pass the folder that holds model_index.json "
                                 f"(train-ldm writes it), e.g. '{self.root.parent}'")
        if not (self.root / "model_index.json").is_file():
            stages = self.stages_present()
            done = f" (it holds the {', '.join(stages)} stage(s) so far)" if stages else ""
            raise RunFolderError(f"'{self.root}' has no model_index.json, so it is not a finished run folder{done}; "
                                 f"train-ldm writes it: run `train-ldm --config ...` into it, or pass another run folder")
        self.model_index(components)  # a damaged index first: it is what names the components
        for name in components:
            needed = COMPONENT_CONFIGS.get(name)
            if needed and not (self.root / name / needed).is_file():
                command = WRITTEN_BY.get(name, "train-ldm")
                what = f"{name}/ is missing" if not (self.root / name).is_dir() else f"{name}/{needed} is missing"
                raise RunFolderError(f"{what} in {self.root}; re-run `{command} --config ...` into this run folder to "
                                     f"write it, or restore {name}/ from a copy of the run")


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
        self._made: list[Path] = []  # the lock file and folders this lock made, innermost first

    def __enter__(self) -> "RunLock":
        self._made = [p for p in (self.path, self.path.parent, *self.path.parent.parents) if not p.exists()]
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

    def __exit__(self, exc_type=None, *exc) -> None:
        if self._file is None:
            return
        # a stage that fails (refused before writing, say) leaves the run folder as it found it: the lock file
        # goes if this lock made it, and so do the folders it made while they are still empty
        if exc_type is not None and self._made and self._made[0] == self.path:
            self.path.unlink(missing_ok=True)
            for folder in self._made[1:]:
                try:
                    folder.rmdir()
                except OSError:  # not empty (the stage wrote something there): kept
                    break
        fcntl.flock(self._file, fcntl.LOCK_UN)
        self._file.close()
        self._file = None
