"""The training objective as pure functions: label and caption dropout, the reference's
weighted NLL with latent-norm regularisation (the training noise: ``flow.noise``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from starflow_jax.flow.loss import nll_loss


def drop_draw(key, n: int, drop_prob: float) -> jax.Array:
    """Which of ``n`` examples lose their label / caption: ``(n,)`` booleans, each true with
    probability ``drop_prob`` (the random part of ``drop_labels`` and ``drop_embeddings``)."""
    return jax.random.uniform(key, (n,)) < drop_prob


def apply_label_drop(labels: jax.Array, drop: jax.Array) -> jax.Array:
    """Labels with the rows ``drop`` marks replaced by -1 (the null label)."""
    return jnp.where(drop, -1, labels)


def apply_embedding_drop(y: jax.Array, drop: jax.Array) -> jax.Array:
    """Conditioning rows ``y[i]`` that ``drop`` marks replaced by the null conditioning, zeros."""
    return jnp.where(drop.reshape((-1,) + (1,) * (y.ndim - 1)), jnp.zeros_like(y), y)


def drop_labels(key, labels: jax.Array, drop_prob: float) -> jax.Array:
    """Replace labels by -1 with probability ``drop_prob`` (for classifier-free guidance)."""
    if drop_prob <= 0:
        return labels
    return apply_label_drop(labels, drop_draw(key, labels.shape[0], drop_prob))


def drop_embeddings(key, y: jax.Array, drop_prob: float) -> jax.Array:
    """Replace whole conditioning rows ``y[i]`` (``(b, txt_size, txt_dim)`` precomputed text
    embeddings) by the null conditioning, zeros, with probability ``drop_prob`` (caption
    dropout for classifier-free guidance; sample with a zero null embedding to match)."""
    if drop_prob <= 0:
        return y
    return apply_embedding_drop(y, drop_draw(key, y.shape[0], drop_prob))


def flow_loss(out, *, weights: jax.Array | None = None, latent_norm_regularization: float = 0.0) -> jax.Array:
    """The reference's training loss from a forward pass."""
    loss = nll_loss(out.z, out.logdets, weights)
    if latent_norm_regularization > 0:
        loss = loss + latent_norm_regularization * sum(jnp.mean(jnp.square(o)) for o in out.outputs[:-1])
    return loss
