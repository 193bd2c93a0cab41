"""Flow blocks, the denoiser and the full model."""

from starflow_jax.model.starflow import FlowOutput, StarFlow

__all__ = ["FlowOutput", "StarFlow"]
