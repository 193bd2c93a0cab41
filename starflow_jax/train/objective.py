"""The training objective as pure functions: noise augmentation, label dropout, the
reference's weighted NLL with latent-norm regularisation."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from starflow_jax.flow.loss import nll_loss


def add_noise(key, x: jax.Array, noise_std: float, noise_type: str, levels: int = 256) -> jax.Array:
    """Gaussian augmentation ``x + noise_std * eps``, or uniform dequantisation of data in
    ``[-1, 1]`` holding ``levels`` discrete values (the reference's rule for 256 levels)."""
    if noise_type == "gaussian":
        return x + noise_std * jax.random.normal(key, x.shape, x.dtype)
    if noise_type == "uniform":
        u = jax.random.uniform(key, x.shape, x.dtype)
        return ((x + 1.0) * ((levels - 1) / 2.0) + u) / levels * 2.0 - 1.0
    raise ValueError(f"noise_type must be 'gaussian' or 'uniform', got {noise_type!r}")


def one_hot_labels(labels: jax.Array, num_classes: int) -> jax.Array:
    """Labels to ``(b, 1, num_classes + 1)`` one-hot rows; label ``-1`` (dropped) is the null
    class at index ``num_classes``, as the reference's label embedding does."""
    idx = jnp.where(labels < 0, num_classes, labels)
    return jax.nn.one_hot(idx, num_classes + 1, dtype=jnp.float32)[:, None, :]


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
