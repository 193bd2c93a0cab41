"""Negative log-likelihood of the flow, per dimension, and bits per dimension."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def _mean_per_example(a: jax.Array) -> jax.Array:
    a = a.astype(jnp.float32)
    if a.ndim == 1:
        return a
    return a.reshape(a.shape[0], -1).mean(axis=1)


def nll_per_example(z: jax.Array, logdets: Sequence[jax.Array]) -> jax.Array:
    """The reference's loss before the batch mean: ``0.5 mean(z^2) - sum_blocks mean(logdet)``
    per example, without the Gaussian constant (nats per dimension)."""
    loss = 0.5 * _mean_per_example(jnp.square(z.astype(jnp.float32)))
    for ld in logdets:
        loss = loss - _mean_per_example(ld)
    return loss


def nll_loss(z: jax.Array, logdets: Sequence[jax.Array], weights: jax.Array | None = None) -> jax.Array:
    """The reference's ``Model.get_loss(...)['loss']``: the (optionally weighted) batch mean."""
    loss = nll_per_example(z, logdets)
    if weights is not None:
        loss = loss * weights
    return loss.mean()


def bits_per_dim(loss: jax.Array | float, data_scale: float = 1.0) -> jax.Array:
    """Bits per dimension from the per-dimension loss above.

    Adds the Gaussian constant ``0.5 log(2 pi)`` left out of the loss and, for
    data that was scaled from a discrete range (e.g. 8-bit pixels mapped to
    ``[-1, 1]``: ``data_scale=127.5``), the log of that scale, then converts nats
    to bits."""
    return (jnp.asarray(loss, jnp.float32) + HALF_LOG_2PI + math.log(data_scale)) / math.log(2.0)
