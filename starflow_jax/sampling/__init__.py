"""Sampling: jitted inversion of flow blocks (sequential with a KV cache, Jacobi), guidance."""

from starflow_jax.sampling.sampler import SamplingOptions, sample

__all__ = ["SamplingOptions", "sample"]
