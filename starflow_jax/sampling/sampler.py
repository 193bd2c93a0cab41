"""Sampling the whole model: the deep block first (with guidance), then the shallow
blocks from the top down, each block one compiled program."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from starflow_jax.model.flow_block import IdentityBlock
from starflow_jax.model.patchify import patchify, unpatchify
from starflow_jax.model.starflow import StarFlow
from starflow_jax.sampling import invert
from starflow_jax.sampling.block_policies import BlockPolicy, check_count


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    guidance: float = 0.0
    attn_temp: float = 1.0
    jacobi: bool = False
    jacobi_block_size: int = 32
    jacobi_th: float = 1e-3
    jacobi_max_iter: int = 32
    # "blockwise": the reference's fixed chunks of jacobi_block_size tokens; "adaptive": a
    # window of jacobi_block_size tokens advancing past the tokens that stopped changing
    # (sampling.invert.jacobi)
    jacobi_policy: str = "blockwise"
    jacobi_init: str = "noise"  # the first iterate of unsampled tokens: the prior noise, "zeros", "previous"
    # One policy per flow block, deep block first (sampling.block_policies); () : every block
    # by the settings above (jacobi or sequential)
    jacobi_blocks: tuple[BlockPolicy, ...] = ()
    # Layers inside the token loop: None = unrolled on the CPU, scanned elsewhere
    # (sampling.invert.resolve_unroll); True / False forces one.
    unroll_layers: bool | None = None
    # Sequential inversion with unrolled layers: the token loop runs in this many segments,
    # each reading only the part of the KV cache written so far (less memory traffic for
    # early tokens, one more copy of the loop body in the program per segment).
    cache_segments: int = 2
    # Sequential inversion with unrolled layers: each projection as this many independent
    # matmuls (None: 2 on the CPU, where XLA then runs them on both cores; see
    # sampling.invert.resolve_splits).
    matmul_splits: int | None = None
    # Videos longer than the attention window (the deep block's sliding window, in
    # frames): None = the model's local_attn_window. When the generated frames fill the
    # window, the last ``context_frames`` (None: window - 1) are re-encoded and sampling
    # goes on (the reference's long-video sampling).
    window_frames: int | None = None
    context_frames: int | None = None


def block_policy(opts: SamplingOptions, index: int) -> BlockPolicy:
    """The policy of flow block ``index`` (0: the deep block), every setting filled in."""
    if opts.jacobi_blocks:
        p = opts.jacobi_blocks[index]
    else:
        p = BlockPolicy(opts.jacobi_policy if opts.jacobi else "sequential")
    return dataclasses.replace(
        p,
        window=opts.jacobi_block_size if p.window is None else p.window,
        th=opts.jacobi_th if p.th is None else p.th,
        max_iter=opts.jacobi_max_iter if p.max_iter is None else p.max_iter,
        init=opts.jacobi_init if p.init is None else p.init,
    )


def _invert_block(
    block,
    h,
    y,
    opts: SamplingOptions,
    guidance: float,
    given=None,
    window=None,
    context=None,
    progress: bool = False,
    index: int = 0,
):
    if isinstance(block, IdentityBlock):
        return h, 0
    unroll = invert.resolve_unroll(opts.unroll_layers)
    p = block_policy(opts, index)
    if p.policy != "sequential":
        return invert.jacobi(
            block,
            h,
            y,
            given,
            guidance=float(guidance),
            attn_temp=float(opts.attn_temp),
            block_size=int(p.window),
            threshold=p.th,
            max_iter=int(p.max_iter),
            unroll=unroll,
            window=window,
            context=context,
            progress=progress,
            policy=p.policy,
            init=p.init,
        )
    return invert.sequential(
        block,
        h,
        y,
        given,
        guidance=float(guidance),
        attn_temp=float(opts.attn_temp),
        unroll=unroll,
        segments=int(opts.cache_segments) if unroll else 1,
        window=window,
        context=context,
        progress=progress,
        splits=invert.resolve_splits(opts.matmul_splits, unroll),
    )


def attention_window(cfg, opts: SamplingOptions, frames: int) -> tuple[int | None, int | None]:
    """``(window, context)`` frames of the deep block for sampling ``frames`` frames:
    ``(None, None)`` when the video fits in the window (or no window is set)."""
    window = opts.window_frames if opts.window_frames is not None else cfg.local_attn_window
    if not window or frames <= window:
        return None, None
    if not cfg.shallow_block_local:
        raise ValueError(
            f"sampling {frames} frames beyond a {window}-frame attention window needs a model with "
            "shallow_block_local=True (frame-local shallow blocks), as in the reference"
        )
    context = opts.context_frames if opts.context_frames is not None else window - 1
    if not 1 <= context < window:
        raise ValueError(f"context_frames must lie in [1, {window - 1}] for a {window}-frame window, got {context}")
    return int(window), int(context)


def context_inputs(model: StarFlow, given: jax.Array, y: jax.Array | None) -> list[jax.Array]:
    """The input of every block (patchified, bottom to top) for the given first frames
    ``(b, g, c, H, W)``: the flow's forward pass over them (the reference's
    ``forward_context``; conditioned on ``y``, the conditional half under guidance)."""
    out = model(given.astype(jnp.float32), y)
    return list(out.outputs[:-1])


def sample(
    model: StarFlow,
    noise: jax.Array,
    y: jax.Array | None = None,
    opts: SamplingOptions | None = None,
    *,
    given: jax.Array | None = None,
    on_block: Callable[[int, int], None] | None = None,
    on_frame: Callable[[int, int], None] | None = None,
    return_passes: bool = False,
):
    """Noise ``(b, c, H, W)`` / ``(b, t, c, H, W)`` to data.

    With ``opts.guidance > 0``, ``y`` is ``concat([y_cond, y_null])`` (batch ``2b``);
    models with ``cond_top_only`` guide only the deep block. ``given`` (video models with
    an SOS token): the first ``g`` frames ``(b, g, c, H, W)`` of the output, kept exactly
    (image-to-video with ``g = 1``, video-to-video); the rest is sampled after them.
    Videos longer than the attention window slide it (``attention_window``).
    ``on_block(i, n)`` is called after each block, ``on_frame(done, frames)`` while the
    deep block samples a video (progress reporting)."""
    opts = opts or SamplingOptions()
    if opts.cache_segments < 1:
        raise ValueError(f"cache_segments must be >= 1, got {opts.cache_segments}")
    if opts.matmul_splits is not None and opts.matmul_splits < 1:
        raise ValueError(f"matmul_splits must be >= 1, got {opts.matmul_splits}")
    cfg = model.cfg
    check_count(opts.jacobi_blocks, len(model.blocks))
    guidance = float(opts.guidance)
    b = noise.shape[0]
    if cfg.txt_dim > 0:
        want = 2 * b if guidance > 0 else b
        if y is None or y.shape[0] != want:
            raise ValueError(
                f"sampling a batch of {b} needs conditioning with batch {want}"
                + (" (concat([y, y_null]) for guidance)" if guidance > 0 else "")
                + f", got {None if y is None else tuple(y.shape)}"
            )
        model.check_inputs(noise, y[:b])
    else:
        if guidance > 0:
            raise ValueError("guidance needs a conditioned model (txt_dim > 0)")
        model.check_inputs(noise, None)
    window, context = (None, None) if noise.ndim == 4 else attention_window(cfg, opts, noise.shape[1])
    inputs = None
    if given is not None:
        if noise.ndim != 5 or given.ndim != 5 or given.shape[0] != b or given.shape[2:] != noise.shape[2:]:
            raise ValueError(
                f"given frames {tuple(given.shape)} must be a video (b, g, c, H, W) matching the "
                f"sampled video {tuple(noise.shape)} in batch, channels and size"
            )
        if not 1 <= given.shape[1] <= noise.shape[1]:
            raise ValueError(f"given frames: {given.shape[1]}, sampled frames: {noise.shape[1]}")
        if not bool(jnp.all(jnp.isfinite(given))):
            raise ValueError("the given frames hold NaN or Inf values")
        inputs = context_inputs(model, given, None if y is None else y[:b])
    h = patchify(noise.astype(jnp.float32), cfg.patch_size)
    passes = []
    blocks = list(model.blocks)
    report = on_frame is not None and h.ndim == 5
    frame = h.shape[2] * h.shape[3] if h.ndim == 5 else 1  # tokens per frame
    with invert.progress_hook(lambda done, total: on_frame(done // frame, total // frame) if report else None):
        h, p = _invert_block(
            blocks[-1], h, y, opts, guidance, None if inputs is None else inputs[-1], window, context, progress=report
        )
    passes.append(p)
    if on_block:
        on_block(1, len(blocks))
    if cfg.cond_top_only and guidance > 0:
        guidance, y = 0.0, y[:b]
    video = h.ndim == 5
    g = 0 if given is None else given.shape[1]
    for k, block in enumerate(reversed(blocks[:-1])):
        level = len(blocks) - 2 - k
        if cfg.shallow_block_local and video:
            # frame-local blocks: the given frames' inputs are known, the others inverted frame by frame
            bb, t = h.shape[:2]
            rest, p = h[:, g:], 0
            if t > g:
                flat = rest.reshape(bb * (t - g), 1, *h.shape[2:])
                out, p = _invert_block(block, flat, y, opts, guidance, index=k + 1)
                rest = out.reshape(rest.shape)
            h = rest if inputs is None else jnp.concatenate([inputs[level][:, :g], rest], axis=1)
        else:
            given_in = None if inputs is None else inputs[level][:, :g]
            h, p = _invert_block(block, h, y, opts, guidance, given_in, index=k + 1)
        passes.append(p)
        if on_block:
            on_block(k + 2, len(blocks))
    x = unpatchify(h, cfg.patch_size)
    if return_passes:
        return x, [int(p) for p in passes]
    return x
