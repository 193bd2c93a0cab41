"""Images ``(..., c, H, W)`` to patch grids ``(..., h, w, p*p*c)`` and back."""

from __future__ import annotations

import jax


def patchify(x: jax.Array, p: int) -> jax.Array:
    *lead, c, H, W = x.shape
    if H % p or W % p:
        raise ValueError(f"image size {H}x{W} is not divisible by patch_size={p}")
    h, w = H // p, W // p
    x = x.reshape(*lead, c, h, p, w, p)
    n = len(lead)
    # (..., c, h, p1, w, p2) -> (..., h, w, p1, p2, c)
    perm = tuple(range(n)) + (n + 1, n + 3, n + 2, n + 4, n)
    return x.transpose(perm).reshape(*lead, h, w, p * p * c)


def unpatchify(x: jax.Array, p: int) -> jax.Array:
    *lead, h, w, d = x.shape
    c = d // (p * p)
    x = x.reshape(*lead, h, w, p, p, c)
    n = len(lead)
    # (..., h, w, p1, p2, c) -> (..., c, h, p1, w, p2)
    perm = tuple(range(n)) + (n + 4, n, n + 2, n + 1, n + 3)
    return x.transpose(perm).reshape(*lead, c, h * p, w * p)
