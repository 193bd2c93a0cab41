"""The reference's wavelet loss (``WaveletLoss3D`` of ``misc/ae_losses.py``, through
``torch_dwt.functional.dwt3(x, "haar")``): the mean absolute difference of two videos'
one-level 3D Haar wavelet coefficients over (frames, height, width).

Per axis the Haar step maps pairs ``(a, b)`` to ``((a + b) / sqrt 2, (a - b) / sqrt 2)``
(float32 ``1/sqrt 2``); an odd-length axis first gets one zero appended at its end. Three
axes give 8 sub-bands; the reference averages over sub-bands, then pixels, then batch and
channels, which (equal counts everywhere) is the mean over every coefficient. The
reference applies it to videos only: images contribute 0 (``losses.generator_loss``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["HAAR", "haar_step", "haar_dwt3", "wavelet_loss"]

HAAR = float(np.float32(1.0 / np.sqrt(2.0)))


def haar_step(x: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    """One Haar step along ``axis``: (low-pass, high-pass), each half as long (rounded up)."""
    axis = axis % x.ndim
    if x.shape[axis] % 2:
        pad = [(0, 0)] * x.ndim
        pad[axis] = (0, 1)
        x = jnp.pad(x, pad)
    a = jax.lax.slice_in_dim(x, 0, None, 2, axis)
    b = jax.lax.slice_in_dim(x, 1, None, 2, axis)
    return HAAR * a + HAAR * b, HAAR * a - HAAR * b


@functools.partial(jax.jit, static_argnames="axes")
def haar_dwt3(x: jax.Array, axes: tuple[int, int, int] = (-3, -2, -1)) -> jax.Array:
    """The one-level 3D Haar transform of ``x`` over ``axes``: the 8 sub-bands stacked in a
    new leading axis, sub-band ``4 i + 2 j + k`` high-pass along ``axes[0]`` if ``i``,
    ``axes[1]`` if ``j``, ``axes[2]`` if ``k``."""
    bands = [x]
    for axis in axes:
        bands = [part for band in bands for part in haar_step(band, axis)]
    return jnp.stack(bands)


@jax.jit
def wavelet_loss(videos: jax.Array, targets: jax.Array) -> jax.Array:
    """The reference's wavelet loss of two ``(b, t, c, h, w)`` video batches: the mean of
    ``|dwt3(videos) - dwt3(targets)|`` over every coefficient, the transform over (t, h, w)."""
    if videos.shape != targets.shape or videos.ndim != 5:
        raise ValueError(
            f"the wavelet loss takes two (b, t, c, h, w) video batches of one shape, got {tuple(videos.shape)} "
            f"and {tuple(targets.shape)}"
        )
    videos, targets = videos.astype(jnp.float32), targets.astype(jnp.float32)
    axes = (1, 3, 4)
    return jnp.mean(jnp.abs(haar_dwt3(videos, axes) - haar_dwt3(targets, axes)))
