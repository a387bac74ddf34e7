"""Sampling defaults tuned for each run: a short search over guidance (steps, guidance interval) after training.

The rule (stated in the output): among the settings whose recognition reaches
`evaluate.tune_min_recognition` and whose weakest class reaches `evaluate.tune_min_class`, the most
diverse one (highest within-class feature spread relative to real images; fewer steps on a tie).
Guidance buys legibility with diversity, so this is the least guidance that is legible enough. If
none reaches both, the same among those reaching the recognition alone; if none reaches that, the
one with the highest recognition. It is measured on its own seed, so the evaluation that follows
does not report the numbers the choice was made on. FD is in the table but not the rule: with the
few images a tuning grid affords it is too noisy to rank settings (measured: rows 0.02 apart).
"""

from __future__ import annotations

import torch

from common.config import Config
from pipelines.quality import DigitClassifier, class_recognition, frechet_distance, relative_diversity


def tune_sampling(pipe, classifier: DigitClassifier, prompts: list[str], holdout_features: torch.Tensor,
                  holdout_labels: torch.Tensor, floor: float, config: Config, device: torch.device,
                  groups: torch.Tensor | None = None) -> dict:
    """Measure every (steps, guidance, interval) of the grid; returns the table, the rule and the chosen setting."""
    cfg = config.evaluate
    table = []
    for steps in cfg.tune_steps:
        for interval in cfg.tune_guidance_intervals:
            for guidance in cfg.tune_guidance:
                setting = {"num_inference_steps": steps, "guidance_scale": guidance, "guidance_interval": list(interval)}
                measured = class_recognition(pipe, classifier, prompts, cfg.tune_images_per_class, config.seed + 2,
                                             device, steps, guidance, desc=f"tune {describe(setting)}", groups=groups,
                                             guidance_interval=tuple(interval))
                diversity = relative_diversity(measured["features"], measured["labels"], holdout_features,
                                               holdout_labels, len(prompts))
                table.append({**setting, "recognition": measured["accuracy"], "min_class": min(measured["per_class"]),
                              "diversity": diversity["relative"],
                              "fd_ratio": frechet_distance(measured["features"], holdout_features) / max(floor, 1e-12)})
                row = table[-1]
                print(f"[tune] {describe(setting)}: recognition {row['recognition']:.1%} (weakest class "
                      f"{row['min_class']:.0%}), diversity {row['diversity']:.2f}, FD ratio {row['fd_ratio']:.2f}")
    chosen, rule = choose_setting(table, cfg.tune_min_recognition, cfg.tune_min_class)
    chosen = {key: chosen[key] for key in ("num_inference_steps", "guidance_scale", "guidance_interval")}
    print(f"[tune] chosen: {describe(chosen)} ({rule})")
    return {"rule": rule, "images_per_class": cfg.tune_images_per_class, "seed": config.seed + 2, "table": table,
            "chosen": chosen}


def describe(setting: dict) -> str:
    """'20 steps, guidance 1.75' (and the interval when not every step is guided)."""
    start, stop = setting["guidance_interval"]
    interval = "" if (start, stop) == (0.0, 1.0) else f" in steps [{start:g}, {stop:g})"
    return f"{setting['num_inference_steps']:3d} steps, guidance {setting['guidance_scale']:5.2f}{interval}"


def choose_setting(table: list[dict], min_recognition: float, min_class: float = 0.0) -> tuple[dict, str]:
    """The row of `table` the rule picks, and the rule as it applied (see the module docstring)."""
    # accuracies are float32 means (18/20 reads 0.8999999762): compare with a tolerance below one image in 10^5
    reaches = lambda value, bar: value >= bar - 1e-6  # noqa: E731
    recognition_bar, class_bar = f"recognition >= {min_recognition * 100:g}%", f"every class >= {min_class * 100:g}%"
    both = recognition_bar + (f" and {class_bar}" if min_class > 0 else "")
    eligible = [r for r in table if reaches(r["recognition"], min_recognition) and reaches(r["min_class"], min_class)]
    rule = f"most diverse among settings with {both}"
    if not eligible and min_class > 0:
        eligible = [r for r in table if reaches(r["recognition"], min_recognition)]
        rule = f"most diverse among settings with {recognition_bar} (none had {class_bar})"
    if eligible:
        return max(eligible, key=lambda r: (r["diversity"], -r["num_inference_steps"])), rule
    return (max(table, key=lambda r: (r["recognition"], r["diversity"])),
            f"most diverse among settings with {both} (none reached it: the highest recognition instead)")
