"""Rotary position embeddings with 2D/3D positions and text positions.

Tables are built in NumPy (float64, then float32) from static shapes at trace
time, so they enter the compiled program as constants. Semantics follow the
reference: positions are given to the *sequence slots* in raster order (text
first), whatever order the block reads its tokens in; the head dimension is
split between the two spatial axes and, when the model has text
(``txt_size > 0``), 8 frequencies for the third (time / text) axis.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

THETA = 10000.0
LATENT_FREQS = 8


def positions(
    h: int, w: int, txt_len: int, pt_seq_len: float | None, frames: int, mode: str, wrap: bool = False
) -> np.ndarray:
    """``(txt_len + frames*h*w, 2 or 3)`` positions of the text and image slots.

    Spatial positions are scaled so that the grid spans ``pt_seq_len`` on
    average (``arange(h) / sqrt(h w) * pt_seq_len``); text slot ``i`` sits at
    ``(0, 0, i / txt_len * pt_seq_len)``; frame ``t`` at third coordinate ``t``.
    ``wrap``: spatial positions in grid units (``arange(h)``), for ``wrap_frequencies``."""
    if mode not in ("2d", "3d"):
        raise ValueError(f"rope mode must be '2d' or '3d', got {mode!r}")
    mean_len = np.sqrt(h * w)
    pt = pt_seq_len or mean_len
    if wrap:
        px, py = np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64)
    else:
        px = np.arange(h, dtype=np.float64) / mean_len * pt
        py = np.arange(w, dtype=np.float64) / mean_len * pt
    px, py = (a.reshape(-1) for a in np.meshgrid(px, py, indexing="ij"))
    if mode == "2d":
        if txt_len:
            raise ValueError("2D RoPE has no text positions")
        return np.stack([px, py], axis=-1)
    if frames == 0:
        cols = [px, py, np.zeros_like(px)]
    else:
        cols = [np.tile(px, frames), np.tile(py, frames), np.repeat(np.arange(frames, dtype=np.float64), h * w)]
    if txt_len > 0:
        pt_txt = np.arange(txt_len, dtype=np.float64) / txt_len * pt
        zeros = np.zeros_like(pt_txt)
        cols = [np.concatenate([zeros, cols[0]]), np.concatenate([zeros, cols[1]]), np.concatenate([pt_txt, cols[2]])]
    return np.stack(cols, axis=-1)


def frequencies(head_dim: int, latent_len: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Spatial frequencies (shared by both spatial axes) and, when ``latent_len > 0``,
    the 8 frequencies of the third axis."""
    half = head_dim // 2
    if latent_len > 0:
        spatial_dim = half - LATENT_FREQS
        f2 = 1.0 / THETA ** (np.arange(LATENT_FREQS, dtype=np.float64) / LATENT_FREQS)
    else:
        spatial_dim, f2 = half, None
    f1 = 1.0 / THETA ** (np.arange(0, spatial_dim, 2, dtype=np.float64)[: spatial_dim // 2] / spatial_dim)
    return f1, f2


def wrap_frequencies(count: int, side: int) -> np.ndarray:
    """``count`` spatial frequencies on a torus of ``side`` grid positions: ``2 pi k / side``
    for ``k = 1 .. count`` (the last one or more fold onto 0 or repeat: a period-``side``
    grid has only ``side`` distinct phases). A wrap-around shift by ``s`` rotates every
    position by the same angle, so attention sees one relative offset for all tokens."""
    return 2.0 * np.pi * np.arange(1, count + 1, dtype=np.float64) / side


@functools.lru_cache(maxsize=256)
def rope_table(
    head_dim: int,
    latent_len: int,
    h: int,
    w: int,
    txt_len: int,
    pt_seq_len: float | None,
    frames: int,
    mode: str,
    wrap: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """``(cos, sin)``, each ``(seq, head_dim)`` float32, for the slots of one block
    (``wrap``: spatial positions on a torus, ``wrap_frequencies``)."""
    pos = positions(h, w, txt_len, pt_seq_len, frames, mode, wrap)
    f1, f2 = frequencies(head_dim, latent_len)
    if wrap:
        parts = [pos[:, 0:1] * wrap_frequencies(len(f1), h), pos[:, 1:2] * wrap_frequencies(len(f1), w)]
    else:
        parts = [pos[:, 0:1] * f1, pos[:, 1:2] * f1]
    if pos.shape[1] == 3:
        if f2 is None:
            raise ValueError("3D RoPE (video, or text positions) needs a model with txt_size > 0")
        parts.append(pos[:, 2:3] * f2)
    ang = np.repeat(np.concatenate(parts, axis=-1), 2, axis=-1)
    if ang.shape[-1] != head_dim:
        raise ValueError(f"RoPE table width {ang.shape[-1]} != head_dim {head_dim}")
    cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
    cos.setflags(write=False)
    sin.setflags(write=False)
    return cos, sin


def _rotate_pairs(x: jax.Array) -> jax.Array:
    """``(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)``."""
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    return jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, hf_style: bool = False) -> jax.Array:
    """Rotate ``x`` of shape ``(b, seq, heads, head_dim)`` by tables ``(seq, head_dim)``.

    The reference rotates interleaved pairs; ``hf_style`` pairs dimension ``i``
    with ``i + head_dim/2`` instead (the Hugging Face layout)."""
    dtype = x.dtype
    h = x.astype(jnp.float32)
    cos = cos[None, :, None, :]
    sin = sin[None, :, None, :]
    if hf_style:
        d = h.shape[-1] // 2
        inter = jnp.stack([h[..., :d], h[..., d:]], axis=-1).reshape(h.shape)
        out = inter * cos + _rotate_pairs(inter) * sin
        out = out.reshape(*h.shape[:-1], d, 2)
        out = jnp.concatenate([out[..., 0], out[..., 1]], axis=-1)
    else:
        out = h * cos + _rotate_pairs(h) * sin
    return out.astype(dtype)
