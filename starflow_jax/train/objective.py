"""The training objective as pure functions: label and caption dropout, the reference's
weighted NLL with latent-norm regularisation (the training noise: ``flow.noise``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from starflow_jax.flow.loss import nll_loss


def drop_labels(key, labels: jax.Array, drop_prob: float) -> jax.Array:
    """Replace labels by -1 with probability ``drop_prob`` (for classifier-free guidance)."""
    if drop_prob <= 0:
        return labels
    return jnp.where(jax.random.uniform(key, labels.shape) < drop_prob, -1, labels)


def drop_embeddings(key, y: jax.Array, drop_prob: float) -> jax.Array:
    """Replace whole conditioning rows ``y[i]`` (``(b, txt_size, txt_dim)`` precomputed text
    embeddings) by the null conditioning, zeros, with probability ``drop_prob`` (caption
    dropout for classifier-free guidance; sample with a zero null embedding to match)."""
    if drop_prob <= 0:
        return y
    drop = jax.random.uniform(key, (y.shape[0],) + (1,) * (y.ndim - 1)) < drop_prob
    return jnp.where(drop, jnp.zeros_like(y), y)


def flow_loss(out, *, weights: jax.Array | None = None, latent_norm_regularization: float = 0.0) -> jax.Array:
    """The reference's training loss from a forward pass."""
    loss = nll_loss(out.z, out.logdets, weights)
    if latent_norm_regularization > 0:
        loss = loss + latent_norm_regularization * sum(jnp.mean(jnp.square(o)) for o in out.outputs[:-1])
    return loss
