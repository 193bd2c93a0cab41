"""Classifier-free guidance for flows, as a pure rule over per-token affine parameters.

The reference's rule, inspired by ``(1 + w) log p_cond - w log p_uncond`` for two
Gaussians: with ``s = min(sigma_c / sigma_u, 1)^2``,

    sigma = sigma_c / sqrt(1 + w - w s)
    mu    = ((1 + w) mu_c - w s mu_u) / (1 + w - w s)

where ``sigma`` is the per-element scale and ``mu`` the shift of the inverse step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def guided_affine(
    scale_c: jax.Array, shift_c: jax.Array, scale_u: jax.Array, shift_u: jax.Array, w: float | jax.Array
) -> tuple[jax.Array, jax.Array]:
    """The guided ``(scale, shift)`` from the conditional and unconditional ones."""
    s = jnp.square(jnp.minimum(scale_c / scale_u, 1.0))
    denom = 1.0 + w - w * s
    return scale_c / jnp.sqrt(denom), ((1.0 + w) * shift_c - (w * s) * shift_u) / denom


def guide_doubled_batch(scale: jax.Array, shift: jax.Array, w: float | jax.Array) -> tuple[jax.Array, jax.Array]:
    """For a batch ``[conditional; unconditional]`` (doubled along axis 0), apply the rule
    and return the guided parameters for both halves (both halves then follow the same
    sample, as in the reference)."""
    half = scale.shape[0] // 2
    sc, g = guided_affine(scale[:half], shift[:half], scale[half:], shift[half:], w)
    return jnp.concatenate([sc, sc], axis=0), jnp.concatenate([g, g], axis=0)
