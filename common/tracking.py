"""What a run shows while and after it trains: tracker hyperparameters and images, and `loss.png`,
the `logs/<stage>.jsonl` histories drawn as curves."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import PIL.Image

from common.checkpoint import write_bytes
from common.config import Config, to_dict

STAGES = ("vae", "clip", "ldm")  # the order a run trains them in
NOT_CURVES = ("step", "time", "lr")


def hyperparameters(config: Config, stage: str, setup: dict | None = None) -> dict[str, str | int | float | bool]:
    """The run's seed, data and this stage's settings, flattened for a tracker's hyperparameter table, and
    what the stage runs with (`setup`, see common.devices.stage_setup) as `<stage>.<key>_used`."""
    flat: dict[str, str | int | float | bool] = {"seed": config.seed}

    def add(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                add(f"{prefix}.{key}", item)
        else:
            flat[prefix] = value if isinstance(value, (str, int, float, bool)) else str(value)

    settings = to_dict(config)
    add("data", settings["data"])
    add(stage, settings[stage])
    flat.update({f"{stage}.{key}_used": value for key, value in (setup or {}).items()})
    return flat


def log_images(trackers: list, tag: str, image: PIL.Image.Image, step: int) -> None:
    """Show `image` under `tag` in every tracker that takes images (TensorBoard's Images tab, W&B, ...)."""
    rgb = image.convert("RGB")
    for tracker in trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({tag: np.asarray(rgb)[None]}, step=step, dataformats="NHWC")
        elif hasattr(tracker, "log_images"):
            tracker.log_images({tag: [rgb]}, step=step)


def read_history(path: Path) -> list[dict]:
    """The records of one stage's log, one per step, in step order.

    A resumed stage replays the steps after its last checkpoint, so a step can be logged twice; the
    later record is the one the finished model went through. Unreadable lines (a process killed
    mid-write) and event records (a stage's final metrics) are skipped.
    """
    by_step: dict[int, dict] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and "event" not in record:
            by_step[record["step"]] = record
    return [by_step[step] for step in sorted(by_step)]


def plot_curves(logs: Path, out: Path) -> Path | None:
    """One panel per trained stage: every logged loss term against the step (log scale when all positive),
    the learning rate dashed on a second axis. Returns `out`, or None when there is no history yet."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: leaves a notebook's backend alone
    from matplotlib.figure import Figure

    histories = {stage: read_history(logs / f"{stage}.jsonl") for stage in STAGES if (logs / f"{stage}.jsonl").is_file()}
    histories = {stage: records for stage, records in histories.items() if records}
    if not histories:
        return None
    figure = Figure(figsize=(5.5 * len(histories), 3.8), layout="constrained")
    FigureCanvasAgg(figure)
    for panel, (stage, records) in enumerate(histories.items()):
        axes = figure.add_subplot(1, len(histories), panel + 1)
        keys = [k for k in records[-1] if k not in NOT_CURVES and not k.startswith("grad_norm")
                and isinstance(records[-1][k], (int, float))]
        positive = True
        for key in keys:
            points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
            if points:
                positive &= all(value > 0 for _, value in points)
                axes.plot(*zip(*points), label=key, linewidth=1.2)
        if positive and keys:
            axes.set_yscale("log")
        axes.set_title(f"{stage} (to step {records[-1]['step']})")
        axes.set_xlabel("step")
        axes.grid(alpha=0.3)
        if any("lr" in r for r in records):
            lr_axes = axes.twinx()
            lr_axes.plot([r["step"] for r in records if "lr" in r], [r["lr"] for r in records if "lr" in r],
                         "--", color="grey", linewidth=0.8, label="lr")
            lr_axes.set_ylabel("learning rate", color="grey")
        axes.legend(loc="upper right", fontsize="small")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    write_bytes(out, buffer.getvalue())
    return out
