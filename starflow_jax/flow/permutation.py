"""Reading orders of the flow blocks, as pure index permutations.

Every block flattens its ``(h, w)`` grid (or ``(t, h, w)`` video) to a sequence
and reads it in one of two orders:

* ``identity``: raster order;
* ``flip``: the reversed sequence; for time-causal video models
  (``temporal_causal``) the flip happens within each frame, so the frames stay in
  time order and the model remains causal in time ("flip in frame"); ``permute``
  takes the number of groups to flip within (1: the whole sequence).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IDENTITY = "identity"
FLIP = "flip"


def block_orders(num_blocks: int, seq_order: str) -> list[str]:
    """The order of every block, bottom (data side) to top (prior side).

    ``R2L`` gives block ``i`` order ``[identity, flip][i % 2]``; ``L2R`` shifts
    by one, so that the top block of an even-numbered stack reads in raster
    order (the reference's rule)."""
    orders = [IDENTITY, FLIP]
    if seq_order == "R2L":
        return [orders[i % 2] for i in range(num_blocks)]
    if seq_order == "L2R":
        return [orders[(i + 1) % 2] for i in range(num_blocks)]
    raise ValueError(f"seq_order must be 'R2L' or 'L2R', got {seq_order!r}")


def flatten_tokens(x: jax.Array) -> jax.Array:
    """``(b, h, w, c)`` or ``(b, t, h, w, c)`` to ``(b, n, c)``."""
    return x.reshape(x.shape[0], -1, x.shape[-1])


def permute(seq: jax.Array, order: str, frames: int) -> jax.Array:
    """Apply ``order`` to ``(b, n, c)`` tokens made of ``frames`` equal groups (a flip
    reverses each group).

    Both orders are involutions, so the same call also undoes them."""
    if order == IDENTITY:
        return seq
    if order != FLIP:
        raise ValueError(f"unknown order {order!r}")
    if frames <= 1:
        return jnp.flip(seq, axis=1)
    b, n, c = seq.shape
    return jnp.flip(seq.reshape(b, frames, n // frames, c), axis=2).reshape(b, n, c)


def token_index(n: int, order: str, frames: int):
    """Index map of ``permute`` for a sequence of length ``n``: position ``i`` of the
    permuted sequence holds raster token ``index[i]``."""
    import numpy as np

    idx = np.arange(n)
    if order == IDENTITY:
        return idx
    if frames <= 1:
        return idx[::-1].copy()
    return idx.reshape(frames, n // frames)[:, ::-1].reshape(n).copy()
