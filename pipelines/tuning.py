"""Sampling defaults tuned for each run: a short search over guidance (and steps) after training.

The rule (stated in the output): among the settings whose recognition reaches
`evaluate.tune_min_recognition` and whose weakest class reaches `evaluate.tune_min_class`, the one with
the lowest Frechet-distance ratio (fewer steps on a tie). If none reaches both, the same among those
reaching the recognition alone; if none reaches that, the one with the highest recognition. It is measured on its own seed, so the
evaluation that follows does not report the numbers the choice was made on.
"""

from __future__ import annotations

import torch

from common.config import Config
from pipelines.quality import DigitClassifier, class_recognition, frechet_distance


def tune_sampling(pipe, classifier: DigitClassifier, prompts: list[str], holdout_features: torch.Tensor, floor: float,
                  config: Config, device: torch.device, groups: torch.Tensor | None = None) -> dict:
    """Measure every (steps, guidance) of the grid; returns the table, the rule and the chosen setting."""
    cfg = config.evaluate
    table = []
    for steps in cfg.tune_steps:
        for guidance in cfg.tune_guidance:
            measured = class_recognition(pipe, classifier, prompts, cfg.tune_images_per_class, config.seed + 2,
                                         device, steps, guidance, desc=f"tune {steps} steps, guidance {guidance}",
                                         groups=groups)
            table.append({"num_inference_steps": steps, "guidance_scale": guidance,
                          "recognition": measured["accuracy"], "min_class": min(measured["per_class"]),
                          "fd_ratio": frechet_distance(measured["features"], holdout_features) / max(floor, 1e-12)})
            row = table[-1]
            print(f"[tune] {steps:3d} steps, guidance {guidance:5.2f}: recognition {row['recognition']:.1%} "
                  f"(weakest class {row['min_class']:.0%}), FD ratio {row['fd_ratio']:.2f}")
    chosen, rule = choose_setting(table, cfg.tune_min_recognition, cfg.tune_min_class)
    print(f"[tune] chosen: {chosen['num_inference_steps']} steps, guidance {chosen['guidance_scale']} ({rule})")
    return {"rule": rule, "images_per_class": cfg.tune_images_per_class, "seed": config.seed + 2, "table": table,
            "chosen": {"num_inference_steps": chosen["num_inference_steps"], "guidance_scale": chosen["guidance_scale"]}}


def choose_setting(table: list[dict], min_recognition: float, min_class: float = 0.0) -> tuple[dict, str]:
    """The row of `table` the rule picks, and the rule as it applied (see the module docstring)."""
    both = f"recognition >= {min_recognition * 100:g}%" + (f" and every class >= {min_class * 100:g}%" if min_class > 0 else "")
    eligible = [r for r in table if r["recognition"] >= min_recognition and r["min_class"] >= min_class]
    rule = f"lowest FD ratio among settings with {both}"
    if not eligible and min_class > 0:
        eligible = [r for r in table if r["recognition"] >= min_recognition]
        rule = (f"lowest FD ratio among settings with recognition >= {min_recognition * 100:g}% "
                f"(none had every class >= {min_class * 100:g}%)")
    if eligible:
        return min(eligible, key=lambda r: (r["fd_ratio"], r["num_inference_steps"])), rule
    return (max(table, key=lambda r: (r["recognition"], -r["fd_ratio"])),
            f"lowest FD ratio among settings with {both} (none reached it: the highest recognition instead)")
