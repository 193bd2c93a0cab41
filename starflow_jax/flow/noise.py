"""The noise a flow is trained on, as pure functions: Gaussian augmentation or uniform
dequantisation (``add_noise``), and the exact inverse of the dequantisation
(``quantize``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _check_type(noise_type: str) -> None:
    if noise_type not in ("gaussian", "uniform"):
        raise ValueError(f"noise_type must be 'gaussian' or 'uniform', got {noise_type!r}")


def draw_noise(key, shape, dtype, noise_type: str) -> jax.Array:
    """The random part of ``add_noise``: standard normal draws (``gaussian``) or uniform
    draws in ``[0, 1)`` (``uniform``) of ``shape``."""
    _check_type(noise_type)
    if noise_type == "gaussian":
        return jax.random.normal(key, shape, dtype)
    return jax.random.uniform(key, shape, dtype)


def apply_noise(x: jax.Array, draw: jax.Array, noise_std: float, noise_type: str, levels: int = 256) -> jax.Array:
    """``x`` with the noise of ``draw`` (``draw_noise``'s) added: ``x + noise_std * draw``, or
    the uniform dequantisation of data in ``[-1, 1]`` holding ``levels`` discrete values (the
    reference's rule for 256 levels: ``((x + 1) * 255 / 2 + u) / 256 * 2 - 1``)."""
    _check_type(noise_type)
    if noise_type == "gaussian":
        return x + noise_std * draw
    return ((x + 1.0) * ((levels - 1) / 2.0) + draw) / levels * 2.0 - 1.0


def add_noise(key, x: jax.Array, noise_std: float, noise_type: str, levels: int = 256) -> jax.Array:
    """Gaussian augmentation ``x + noise_std * eps``, or uniform dequantisation of data in
    ``[-1, 1]`` holding ``levels`` discrete values (the reference's rule for 256 levels)."""
    return apply_noise(x, draw_noise(key, x.shape, x.dtype, noise_type), noise_std, noise_type, levels)


def quantize(x: jax.Array, levels: int) -> jax.Array:
    """The inverse of uniform dequantisation: each value of ``[-1, 1]`` back to the discrete
    level whose dequantisation bin holds it (``levels`` values, ``-1`` to ``1``); values
    outside the bins go to the nearest end level."""
    k = jnp.clip(jnp.floor((x + 1.0) / 2.0 * levels), 0, levels - 1)
    return k / (levels - 1) * 2.0 - 1.0
