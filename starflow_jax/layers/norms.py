"""Normalisation layers with the reference's numerics and parameter names."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from starflow_jax.parallel.rules import logical_axes


class RMSNorm(nnx.Module):
    """RMS norm with a unit offset: ``x / rms(x) * (1 + weight)``, computed in float32
    (eps 1e-6, weight initialised to zero, as in the reference)."""

    def __init__(self, dim: int, *, eps: float = 1e-6, param_dtype=jnp.float32):
        self.eps = eps
        self.weight = nnx.Param(jnp.zeros((dim,), param_dtype), **logical_axes("norm"))

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(jnp.square(h), axis=-1, keepdims=True) + self.eps)
        return (h * (1.0 + self.weight[...].astype(jnp.float32))).astype(x.dtype)


class LayerNorm(nnx.Module):
    """Layer norm with an affine ``weight``/``bias`` (torch's defaults: eps 1e-5), in float32."""

    def __init__(self, dim: int, *, eps: float = 1e-5, param_dtype=jnp.float32):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype), **logical_axes("norm"))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), **logical_axes("norm"))

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.astype(jnp.float32)
        mean = jnp.mean(h, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(h - mean), axis=-1, keepdims=True)
        h = (h - mean) * jax.lax.rsqrt(var + self.eps)
        return (h * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


def make_norm(norm_type: str, dim: int, param_dtype=jnp.float32):
    """The pre-norm of an attention or MLP sub-layer; ``None`` for ``norm_type='none'``."""
    if norm_type == "layer_norm":
        return LayerNorm(dim, param_dtype=param_dtype)
    if norm_type == "rms_norm":
        return RMSNorm(dim, param_dtype=param_dtype)
    if norm_type == "none":
        return None
    raise ValueError(f"unknown norm_type {norm_type!r}")
