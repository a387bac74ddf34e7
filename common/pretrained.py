"""Where a stage's starting weights come from when `<stage>.init_from` is set (fine-tuning).

`init_from` names a run folder, a diffusers pipeline folder (both hold one sub-folder per component:
`vae/`, `unet/`, `clip/`), or the model's own folder (a `config.json` beside its safetensors weights).
The model's architecture comes from that folder; the stage copies it into its config section, so
the run's saved `config.yaml` describes the model it really trained.
"""

from __future__ import annotations

import json
from pathlib import Path

from common.checkpoint import check_weights
from common.errors import UserError
from common.run import WRITTEN_BY


def init_source(path: str, component: str, key: str, class_names: tuple[str, ...], hint: str = "") -> Path:
    """The folder holding `component`'s config and weights: `path/component`, or `path` itself.

    Raises UserError naming `key` when `path` is not a folder, holds no such model, or holds a model
    of another class (e.g. a UNet where a VAE was asked for).
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise UserError(f"{key}='{path}' is not a folder; point it at a run folder, or at a diffusers-format "
                        f"{component} folder (config.json and safetensors weights)")
    for folder in (root / component, root):
        config_file = folder / "config.json"
        if not config_file.is_file():
            continue
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise UserError(f"{key}: {config_file} is not valid JSON ({error}); the folder is damaged") from None
        found = config.get("_class_name") or (config.get("architectures") or [None])[0] or config.get("model_type")
        if found in class_names:
            if not any(folder.glob("*.safetensors")):
                raise UserError(f"{key}: {folder} has no .safetensors weights (only safetensors are loaded, never "
                                f"pickled .bin files); convert them with save_pretrained(..., safe_serialization=True)")
            return folder
        if folder == root / component or found is not None:
            raise UserError(f"{key}: {config_file} describes a {found}, not a {' or '.join(class_names)}; "
                            f"point {key} at the {component} of a run")
    raise UserError(f"{key}='{path}' holds no {component}: neither {root / component}/config.json nor "
                    f"{root}/config.json exists. Point it at a run folder that has trained this stage, or at a "
                    f"diffusers-format {component} folder{hint}")


def check_init_elsewhere(init_from: str, run_dir: Path, stage: str) -> None:
    """Refuse `<stage>.init_from` inside the run folder being trained: the stage would overwrite the weights it
    starts from, so the base is lost and the run's config.yaml no longer names what it was trained from."""
    if not init_from:
        return
    source, root = Path(init_from).expanduser().resolve(), run_dir.expanduser().resolve()
    if source == root or root in source.parents:
        raise UserError(f"{stage}.init_from='{init_from}' is inside this run's own folder ({run_dir}): training would "
                        f"replace the weights it starts from. Fine-tune into a new run: --set run_dir=NEW "
                        f"--set {stage}.init_from={run_dir}")


def adopt_architecture(section, values: dict, stage: str) -> str:
    """Copy a loaded model's architecture into its config section (so the saved config.yaml is true);
    returns a line saying what changed, for the log."""
    changes = [f"{stage}.{name} {getattr(section, name)} -> {value}" for name, value in values.items()
               if getattr(section, name) != value]
    for name, value in values.items():
        setattr(section, name, value)
    return ("architecture from init_from: " + "; ".join(changes)) if changes else "architecture as configured"


def forget_source_path(model) -> None:
    """Drop the `_name_or_path` that diffusers' from_pretrained adds to a model's config: save_pretrained
    would write it out, and an unchanged copy (vae.max_steps=0) would no longer hash like its source."""
    from diffusers.configuration_utils import FrozenDict

    model._internal_dict = FrozenDict({k: v for k, v in model._internal_dict.items() if k != "_name_or_path"})


def load_diffusers_model(model_class, path: str, component: str, key: str):
    """The diffusers model (`AutoencoderKL`, `UNet2DConditionModel`) a stage starts from: found by
    `init_source`, read offline from safetensors, its source path dropped from the config. Returns
    the model and the folder it came from."""
    folder = init_source(path, component, key, (model_class.__name__,))
    check_weights(folder, WRITTEN_BY[component])  # a cut-short file named with what is wrong, not a bare OSError
    model = model_class.from_pretrained(folder, use_safetensors=True, local_files_only=True)
    forget_source_path(model)
    return model, folder
