"""The flow math of one TARFlow block, as pure functions over arrays.

A block predicts, for every token, a raw output ``(a, b)``; ``a`` becomes a
positive scale ``s`` (``exp(a)`` or ``softplus(a + softplus^-1(1))``) and ``b``
a shift. Forward (data to noise) is ``z = (x - b) / s`` with log-determinant
``-log s`` per element; the inverse is ``x = z * s + b``. All of it runs in
float32 whatever the network's compute dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# softplus^{-1}(1) = log(e - 1): makes a zero raw output a unit scale.
INV_SOFTPLUS_1 = 0.541324854612918


def soft_clip(x: jax.Array, bound: float) -> jax.Array:
    """``bound * tanh(x / bound)``; the identity when ``bound <= 0``."""
    if not bound or bound <= 0:
        return x
    return bound * jnp.tanh(x / bound)


def scale_from_raw(a: jax.Array, use_softplus: bool) -> jax.Array:
    """The positive per-element scale from the network's raw ``a`` output (float32)."""
    a = a.astype(jnp.float32)
    if use_softplus:
        return jax.nn.softplus(a + INV_SOFTPLUS_1)
    return jnp.exp(a)


def split_raw(raw: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Split the last axis ``2c`` of the raw output into ``(a, b)``, both float32."""
    a, b = jnp.split(raw, 2, axis=-1)
    return a.astype(jnp.float32), b.astype(jnp.float32)


def affine_forward(x: jax.Array, scale: jax.Array, shift: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Data to noise: ``z = (x - shift) / scale`` and the elementwise log-det ``-log scale``."""
    x = x.astype(jnp.float32)
    return (x - shift) / scale, -jnp.log(scale)


def affine_inverse(z: jax.Array, scale: jax.Array, shift: jax.Array) -> jax.Array:
    """Noise to data: ``x = z * scale + shift``."""
    return z.astype(jnp.float32) * scale + shift


def shift_right(h: jax.Array) -> jax.Array:
    """Without an SOS token the prediction for token ``t`` comes from token ``t-1``:
    shift the outputs one step along the sequence axis, zeros for the first token
    (a zero raw output: unit scale, zero shift)."""
    return jnp.concatenate([jnp.zeros_like(h[:, :1]), h[:, :-1]], axis=1)
