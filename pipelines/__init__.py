"""Inference: `LatentPipeline` (a diffusers DiffusionPipeline) and the `generate` / `evaluate` commands."""

from pipelines.latent_pipeline import LatentPipeline, LatentPipelineOutput

__all__ = ["LatentPipeline", "LatentPipelineOutput"]
