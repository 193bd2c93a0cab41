"""The noise a flow is trained on, as pure functions: Gaussian augmentation or uniform
dequantisation (``add_noise``), and the exact inverse of the dequantisation
(``quantize``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def add_noise(key, x: jax.Array, noise_std: float, noise_type: str, levels: int = 256) -> jax.Array:
    """Gaussian augmentation ``x + noise_std * eps``, or uniform dequantisation of data in
    ``[-1, 1]`` holding ``levels`` discrete values (the reference's rule for 256 levels)."""
    if noise_type == "gaussian":
        return x + noise_std * jax.random.normal(key, x.shape, x.dtype)
    if noise_type == "uniform":
        u = jax.random.uniform(key, x.shape, x.dtype)
        return ((x + 1.0) * ((levels - 1) / 2.0) + u) / levels * 2.0 - 1.0
    raise ValueError(f"noise_type must be 'gaussian' or 'uniform', got {noise_type!r}")


def quantize(x: jax.Array, levels: int) -> jax.Array:
    """The inverse of uniform dequantisation: each value of ``[-1, 1]`` back to the discrete
    level whose dequantisation bin holds it (``levels`` values, ``-1`` to ``1``); values
    outside the bins go to the nearest end level."""
    k = jnp.clip(jnp.floor((x + 1.0) / 2.0 * levels), 0, levels - 1)
    return k / (levels - 1) * 2.0 - 1.0
