"""Watching a run: TensorBoard (accelerate's trackers), loss.png, and the report_to setting."""

import json
from pathlib import Path

import pytest
from accelerate.utils import LoggerType
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from common.config import TRACKERS, ConfigError
from common.errors import UserError
from common.tracking import hyperparameters, plot_curves, read_history
from conftest import tiny_config
from ldm.train_clip import main as train_clip


def events(folder: Path) -> EventAccumulator:
    """Everything TensorBoard shows for one stage (its top-level event file)."""
    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    return accumulator


def test_every_stage_logs_curves_and_samples_to_tensorboard(tiny_run):
    config = tiny_config(tiny_run)
    for stage, steps in (("clip", config.clip.max_steps), ("vae", config.vae.max_steps), ("ldm", config.ldm.max_steps)):
        logged = events(tiny_run / "logs" / stage)
        # the same numbers as logs/<stage>.jsonl, step for step (tiny.yaml logs every step)
        history = read_history(tiny_run / "logs" / f"{stage}.jsonl")
        assert [e.step for e in logged.Scalars("train/lr")] == list(range(1, steps + 1))
        assert [round(e.value, 6) for e in logged.Scalars("train/lr")] == [round(r["lr"], 6) for r in history]
        norm = "grad_norm_vae" if stage == "vae" else "grad_norm"
        assert [e.value for e in logged.Scalars(f"train/{norm}")] == pytest.approx([r[norm] for r in history], rel=1e-6)
    ldm = events(tiny_run / "logs" / "ldm")
    assert [e.value for e in ldm.Scalars("train/loss")] == pytest.approx(
        [r["loss"] for r in read_history(tiny_run / "logs" / "ldm.jsonl")], rel=1e-6)
    # sample grids every sample_every steps, as in run/samples/ (the VAE's final reconstructions too)
    assert [e.step for e in ldm.Images("samples/ldm")] == [4]
    assert [e.step for e in events(tiny_run / "logs" / "vae").Images("samples/vae")] == [2, 4, 4]
    assert sorted(p.name for p in (tiny_run / "samples").glob("*.png")) == [
        "ldm-step000004.png", "vae-reconstructions.png", "vae-step000002.png", "vae-step000004.png"]
    # a stage's final metrics go to the trackers too
    assert [e.value for e in events(tiny_run / "logs" / "clip").Scalars("final/vocab_size")] == [
        json.loads((tiny_run / "clip_metrics.json").read_text())["vocab_size"]]


def test_loss_png_has_one_panel_per_trained_stage(tiny_run):
    curves = Image.open(tiny_run / "loss.png")
    assert curves.format == "PNG" and curves.width == 3 * 550 and curves.height == 380


def test_history_keeps_the_last_record_of_a_replayed_step(tmp_path):
    log = tmp_path / "ldm.jsonl"
    records = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}, {"step": 3, "loss": 9.0},  # killed after step 3,
               {"step": 3, "loss": 1.5}, {"event": "final", "step": 3, "psnr": 20.0}]       # resumed from step 2
    log.write_text("\n".join(json.dumps(r) for r in records[:3]) + '\n{"step": 4, "lo\n'
                   + "\n".join(json.dumps(r) for r in records[3:]) + "\n")
    assert read_history(log) == [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}, {"step": 3, "loss": 1.5}]
    assert plot_curves(tmp_path, tmp_path / "loss.png") == tmp_path / "loss.png"
    assert Image.open(tmp_path / "loss.png").size == (550, 380)
    assert plot_curves(tmp_path / "nothing", tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()


def test_report_to_none_writes_no_tracker_files(tmp_path):
    train_clip(tiny_config(tmp_path / "run", "clip.report_to=none", "clip.max_steps=1"))
    assert sorted(p.name for p in (tmp_path / "run" / "logs").iterdir()) == ["clip.jsonl"]
    assert (tmp_path / "run" / "loss.png").is_file()


def test_a_tracker_that_is_not_installed_is_refused_before_anything_is_written(tmp_path):
    config = tiny_config(tmp_path / "run", "clip.report_to=tensorboard,wandb")
    with pytest.raises(UserError) as error:
        train_clip(config)
    assert str(error.value) == ("config key 'clip.report_to' asks for wandb, which is not installed: pip install wandb, "
                                "or set clip.report_to=none (or auto: TensorBoard when installed)")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value", ["tensorbord", "auto,wandb", "none,tensorboard", "", "all,wandb",
                                   "tensorboard,tensorboard"])
def test_an_unknown_tracker_name_is_refused(tmp_path, value):
    with pytest.raises(ConfigError) as error:
        tiny_config(tmp_path, f"ldm.report_to={value}")
    assert str(error.value).startswith("config key 'ldm.report_to' must be auto, none or all alone, or tracker names "
                                       "separated by commas, each once (aim, tensorboard, wandb,")
    assert str(error.value).endswith(f"got {value!r}")


def test_tracker_names_are_accelerates():
    assert TRACKERS == tuple(t.value for t in LoggerType)


def test_hyperparameters_are_flat_and_scalar(tmp_path):
    flat = hyperparameters(tiny_config(tmp_path), "ldm")
    assert flat["seed"] == 0 and flat["ldm.lr"] == tiny_config(tmp_path).ldm.lr
    assert flat["ldm.block_out_channels"] == str(tiny_config(tmp_path).ldm.block_out_channels)
    assert flat["data.augment.rotate_degrees"] == 8
    assert not any(key.startswith(("vae.", "clip.")) for key in flat)
    assert all(isinstance(v, (str, int, float, bool)) for v in flat.values())


@pytest.mark.parametrize("report_to", ["none", "tensorboard"])
def test_a_file_where_the_logs_folder_goes_is_refused_before_anything_is_written(tmp_path, report_to):
    """logs/<stage>.jsonl is written after the first step and TensorBoard's folder at init_trackers: a file
    named `logs` in the run folder is refused up front, not a traceback after config.yaml was written."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "logs").write_text("not a folder")
    with pytest.raises(UserError) as error:
        train_clip(tiny_config(run, f"clip.report_to={report_to}"))
    assert str(error.value) == (f"the clip stage's folder '{run / 'logs'}' is a file, not a folder; "
                                f"move it out of the way, or choose another run_dir")
    assert sorted(p.name for p in run.iterdir()) == ["logs"]
