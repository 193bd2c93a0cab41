"""Sampling the whole model: the deep block first (with guidance), then the shallow
blocks from the top down, each block one compiled program."""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from starflow_jax.model.flow_block import IdentityBlock
from starflow_jax.model.patchify import patchify, unpatchify
from starflow_jax.model.starflow import StarFlow
from starflow_jax.sampling import invert


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    guidance: float = 0.0
    attn_temp: float = 1.0
    jacobi: bool = False
    jacobi_block_size: int = 32
    jacobi_th: float = 1e-3
    jacobi_max_iter: int = 32
    # The reference computes an annealing ratio (t+1)/T but its guidance rule uses the
    # unscaled weight, so annealing does not change its samples; accepted for parity.
    annealed_guidance: bool = False
    # Layers inside the token loop: None = unrolled on the CPU, scanned elsewhere
    # (sampling.invert.resolve_unroll); True / False forces one.
    unroll_layers: bool | None = None
    # Sequential inversion with unrolled layers: the token loop runs in this many segments,
    # each reading only the part of the KV cache written so far (less memory traffic for
    # early tokens, one more copy of the loop body in the program per segment).
    cache_segments: int = 2


def _invert_block(block, h, y, opts: SamplingOptions, guidance: float):
    if isinstance(block, IdentityBlock):
        return h, 0
    unroll = invert.resolve_unroll(opts.unroll_layers)
    if opts.jacobi:
        return invert.jacobi(block, h, y, guidance=float(guidance), attn_temp=float(opts.attn_temp),
                             block_size=int(opts.jacobi_block_size), threshold=opts.jacobi_th,
                             max_iter=int(opts.jacobi_max_iter), unroll=unroll)
    return invert.sequential(block, h, y, guidance=float(guidance), attn_temp=float(opts.attn_temp),
                             unroll=unroll, segments=int(opts.cache_segments) if unroll else 1)


def sample(model: StarFlow, noise: jax.Array, y: jax.Array | None = None, opts: SamplingOptions | None = None,
           *, on_block: Callable[[int, int], None] | None = None, return_passes: bool = False):
    """Noise ``(b, c, H, W)`` / ``(b, t, c, H, W)`` to data.

    With ``opts.guidance > 0``, ``y`` is ``concat([y_cond, y_null])`` (batch ``2b``);
    models with ``cond_top_only`` guide only the deep block. ``on_block(i, n)`` is called
    after each block (progress reporting)."""
    opts = opts or SamplingOptions()
    if opts.cache_segments < 1:
        raise ValueError(f"cache_segments must be >= 1, got {opts.cache_segments}")
    cfg = model.cfg
    guidance = float(opts.guidance)
    b = noise.shape[0]
    if cfg.txt_dim > 0:
        want = 2 * b if guidance > 0 else b
        if y is None or y.shape[0] != want:
            raise ValueError(f"sampling a batch of {b} needs conditioning with batch {want}"
                             + (" (concat([y, y_null]) for guidance)" if guidance > 0 else "")
                             + f", got {None if y is None else tuple(y.shape)}")
        model.check_inputs(noise, y[:b])
    else:
        if guidance > 0:
            raise ValueError("guidance needs a conditioned model (txt_dim > 0)")
        model.check_inputs(noise, None)
    if noise.ndim == 5 and cfg.local_attn_window and noise.shape[1] > cfg.local_attn_window:
        raise ValueError(f"{noise.shape[1]} frames exceed local_attn_window={cfg.local_attn_window}: sampling "
                         "beyond the attention window (sliding window with context re-encoding) is not "
                         "implemented yet (issue #7)")
    h = patchify(noise.astype(jnp.float32), cfg.patch_size)
    passes = []
    blocks = list(model.blocks)
    h, p = _invert_block(blocks[-1], h, y, opts, guidance)
    passes.append(p)
    if on_block:
        on_block(1, len(blocks))
    if cfg.cond_top_only and guidance > 0:
        guidance, y = 0.0, y[:b]
    video = h.ndim == 5
    for k, block in enumerate(reversed(blocks[:-1])):
        if cfg.shallow_block_local and video:
            bb, t = h.shape[:2]
            out, p = _invert_block(block, h.reshape(bb * t, 1, *h.shape[2:]), y, opts, guidance)
            h = out.reshape(h.shape)
        else:
            h, p = _invert_block(block, h, y, opts, guidance)
        passes.append(p)
        if on_block:
            on_block(k + 2, len(blocks))
    x = unpatchify(h, cfg.patch_size)
    if return_passes:
        return x, [int(p) for p in passes]
    return x
