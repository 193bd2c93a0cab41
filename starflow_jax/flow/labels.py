"""Class labels as the conditioning rows of a label-conditioned model."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def one_hot_labels(labels: jax.Array, num_classes: int) -> jax.Array:
    """Labels to ``(b, 1, num_classes + 1)`` one-hot rows; label ``-1`` (dropped) is the null
    class at index ``num_classes``, as the reference's label embedding does."""
    idx = jnp.where(labels < 0, num_classes, labels)
    return jax.nn.one_hot(idx, num_classes + 1, dtype=jnp.float32)[:, None, :]
