"""Inverting one flow block (noise to data), inside ``jax.jit``.

Both inversions keep a preallocated KV cache per layer, ``(layers, b, slots,
kv_heads, head_dim)`` with ``slots = text + tokens``, carried as a pytree through
``lax`` loops; the text prefix is written once.

* ``sequential``: one network pass per token (``lax.fori_loop``).
* ``jacobi``: the sequence is cut into chunks; each chunk is iterated to a fixed point
  (``lax.while_loop``) with all its tokens updated in parallel per pass, until the
  relative mean squared change falls under ``jacobi_th`` or ``jacobi_max_iter`` passes
  were made. For video, the chunks after the first frame are 4x larger and a chunk's
  first iterate reads the tokens one frame earlier (the reference's video-aware schedule).
Both land on the same fixed point.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from starflow_jax.flow import affine
from starflow_jax.flow.guidance import guide_doubled_batch
from starflow_jax.layers.transformer import apply_layers_cached, apply_stack_cached, unstack_layers
from starflow_jax.model.flow_block import FlowBlock, block_rope


def resolve_unroll(unroll: bool | None) -> bool:
    """``None`` (auto): unroll the layers inside the token loop on the CPU, where a matmul
    cannot read a dynamic slice of the stacked weights in place (each scanned layer step
    would copy its weights and cache), and keep them scanned elsewhere (TPU, GPU), where
    the program then stays the same size whatever the depth."""
    return jax.default_backend() == "cpu" if unroll is None else bool(unroll)


def token_segments(n: int, segments: int) -> list[int]:
    """Bounds ``[0, ..., n]`` of ``segments`` near-equal runs of token positions."""
    segments = max(1, min(int(segments), n))
    return [round(i * n / segments) for i in range(segments + 1)]


class _Decoder:
    """A block prepared for decoding: its modules are rebuilt from fresh Variables inside
    each ``lax`` loop body (NNX objects must be created at the trace level of the body
    that uses them; the arrays are closed over), with the layers either stacked (scanned)
    or unstacked once, outside the loops (unrolled).

    The KV cache of a layer is ``(b, kv_heads, slots, head_dim)``, stacked along a leading
    layer axis when scanned. Unrolled, it may be cut into chunks at token segment bounds
    (``token_bounds``): while decoding segment ``g`` attention reads chunks ``0..g`` only,
    so early tokens do not stream the empty tail of the cache through memory."""

    def __init__(self, block: FlowBlock, unroll: bool):
        self.block = block
        self.graphdef, self.state = nnx.split(block)
        self.layers = ([nnx.split(layer) for layer in unstack_layers(block.attn_blocks, block.num_layers)]
                       if unroll else None)
        self.first_slots = (0,)

    def modules(self):
        block = nnx.merge(self.graphdef, jax.tree.map(lambda a: a, self.state))
        if self.layers is None:
            return block, None
        return block, [nnx.merge(g, jax.tree.map(lambda a: a, s)) for g, s in self.layers]

    def empty_cache(self, b: int, prefix: int, token_bounds: list[int]):
        """Zeroed caches for ``prefix`` text slots and the tokens; chunk ``g`` holds the
        slots of tokens ``token_bounds[g]..token_bounds[g+1]-1`` (chunk 0 the text too)."""
        spec = self.block.spec
        dt = jnp.dtype(spec.dtype)
        slots = [0] + [prefix + t for t in token_bounds[1:]]
        if self.layers is None:
            if len(token_bounds) != 2:
                raise ValueError("a chunked KV cache needs unrolled layers")
            full = (self.block.num_layers, b, spec.num_kv_heads, slots[-1], spec.head_dim)
            return jnp.zeros(full, dt), jnp.zeros(full, dt)
        self.first_slots = tuple(slots[:-1])
        chunk = lambda n: jnp.zeros((b, spec.num_kv_heads, n, spec.head_dim), dt)  # noqa: E731
        return [[(chunk(hi - lo), chunk(hi - lo)) for lo, hi in zip(slots[:-1], slots[1:])]
                for _ in range(self.block.num_layers)]

    def layers_cached(self, block: FlowBlock, layers, h, rope, cache, slot, write: int, attn_temp: float):
        if layers is None:
            h, ck, cv = apply_stack_cached(block.attn_blocks, h, rope, cache[0], cache[1], slot, attn_temp)
            return h, (ck, cv)
        return apply_layers_cached(layers, h, rope, cache, self.first_slots, slot, write, attn_temp)


def _setup(dec: _Decoder, z_img: jax.Array, y, guidance: float, attn_temp: float, segments: int = 1):
    """Tokens in reading order (batch doubled under guidance), the RoPE table, the token
    segment bounds, and a KV cache with the text prefix already written."""
    block = dec.block
    seq, frames = block.tokens(z_img.astype(jnp.float32))
    if guidance > 0:
        seq = jnp.concatenate([seq, seq], axis=0)
    b, n, _ = seq.shape
    txt = block.text_prefix(y)
    if txt is not None and txt.shape[0] != b:
        raise ValueError(f"conditioning has batch {txt.shape[0]}, sampling needs {b}"
                         + (" (guidance doubles the batch: pass concat([y, y_null]))" if guidance > 0 else ""))
    prefix = 0 if txt is None else txt.shape[1]
    rope = block_rope(block.cfg, block.spec.head_dim, z_img.shape, prefix, block.conditioned)
    bounds = token_segments(n, segments if dec.layers is not None else 1)
    cache = dec.empty_cache(b, prefix, bounds)
    if txt is not None:
        r = None if rope is None else (rope[0][:prefix], rope[1][:prefix])
        blk, layers = dec.modules()
        _, cache = dec.layers_cached(blk, layers, txt.astype(jnp.dtype(block.spec.dtype)), r, cache, jnp.int32(0),
                                     0, attn_temp)
    return seq, frames, prefix, rope, bounds, cache


def _rope_rows(rope, start, m):
    if rope is None:
        return None
    return (jax.lax.dynamic_slice_in_dim(rope[0], start, m, 0), jax.lax.dynamic_slice_in_dim(rope[1], start, m, 0))


def _predict(dec: _Decoder, block: FlowBlock, layers, tokens_in, cache, rope, slot, write, pos_index, attn_temp,
             guidance):
    """One network pass over ``m`` input tokens at cache slot ``slot`` (in cache chunk
    ``write``): the inverse step's ``(scale, shift)`` for the ``m`` tokens they predict,
    and the new cache."""
    m = tokens_in.shape[1]
    h = block.proj_in(tokens_in.astype(block.proj_in.kernel[...].dtype))
    if block.pos_embed is not None:
        h = h + jax.lax.dynamic_slice_in_dim(block.pos_embed[...], pos_index, m, 0)[None].astype(h.dtype)
    h, cache = dec.layers_cached(block, layers, h, _rope_rows(rope, slot, m), cache, slot, write, attn_temp)
    if block.final_norm is not None:
        h = block.final_norm(h)
    raw = affine.soft_clip(block.proj_out(h), block.cfg.soft_clip)
    a, b = affine.split_raw(raw)
    scale = affine.scale_from_raw(a, block.cfg.use_softplus)
    if guidance > 0:
        scale, b = guide_doubled_batch(scale, b, guidance)
    return scale, b, cache


def _finish(block, x, z_img, frames, guidance):
    if guidance > 0:
        x = x[: x.shape[0] // 2]
    return block.untokens(x, z_img.shape, frames)


def _check_block_positions(block: FlowBlock, n: int):
    if block.pos_embed is not None and block.pos_embed.shape[0] != n:
        raise ValueError(f"learned position embeddings cover {block.pos_embed.shape[0]} tokens, sampling {n}")


@functools.partial(nnx.jit, static_argnames=("guidance", "attn_temp", "unroll", "segments"))
def sequential(block: FlowBlock, z_img: jax.Array, y=None, *, guidance: float = 0.0, attn_temp: float = 1.0,
               unroll: bool = False, segments: int = 1):
    """Autoregressive inversion of ``block``: ``z_img`` (patchified, block input shape) to
    the block's input. Returns ``(x, passes)``. ``unroll``: see ``resolve_unroll``;
    ``segments`` (unrolled only): the token loop runs in that many segments, each reading
    only the KV cache written so far (see ``_Decoder``)."""
    dec = _Decoder(block, unroll)
    z, frames, prefix, rope, bounds, cache = _setup(dec, z_img, y, guidance, attn_temp, segments)
    _check_block_positions(block, z.shape[1])
    n = z.shape[1]
    use_sos = block.sos_embed is not None
    steps = n if use_sos else n - 1
    sos = None
    if use_sos:
        sos = jnp.broadcast_to(block.sos_embed[...].astype(jnp.float32), (z.shape[0], 1, z.shape[2]))

    def body(t, carry, write):
        x, cache = carry
        block, layers = dec.modules()
        if use_sos:
            prev = jax.lax.dynamic_slice_in_dim(x, jnp.maximum(t - 1, 0), 1, 1)
            tok = jnp.where(t == 0, sos, prev)
            target = t
        else:
            tok = jax.lax.dynamic_slice_in_dim(x, t, 1, 1)
            target = t + 1
        scale, shift, cache = _predict(dec, block, layers, tok, cache, rope, prefix + t, write, t, attn_temp, guidance)
        new = affine.affine_inverse(jax.lax.dynamic_slice_in_dim(z, target, 1, 1), scale, shift)
        return jax.lax.dynamic_update_slice_in_dim(x, new, target, 1), cache

    carry = (z, cache)
    for g, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        hi = min(hi, steps)
        if hi > lo:
            carry = jax.lax.fori_loop(lo, hi, functools.partial(body, write=g), carry)
    return _finish(block, carry[0], z_img, frames, guidance), jnp.int32(steps)


def jacobi_schedule(n: int, frame: int, block_size: int) -> list[tuple[int, int, int]]:
    """Chunks as runs ``(first_start, size, count)`` of equal-size consecutive chunks:
    ``block_size`` tokens while the chunk starts within the first frame (or at its end),
    ``4 * block_size`` after, the last chunk cut at ``n``."""
    if block_size <= 0:
        raise ValueError(f"jacobi_block_size must be positive, got {block_size}")
    chunks = []
    start = 0
    while start < n:
        size = block_size if start <= frame else 4 * block_size
        size = min(size, n - start)
        chunks.append((start, size))
        start += size
    runs: list[list[int]] = []
    for start, size in chunks:
        if runs and runs[-1][1] == size:
            runs[-1][2] += 1
        else:
            runs.append([start, size, 1])
    return [tuple(r) for r in runs]


@functools.partial(nnx.jit, static_argnames=("guidance", "attn_temp", "block_size", "max_iter", "unroll"))
def jacobi(block: FlowBlock, z_img: jax.Array, y=None, *, guidance: float = 0.0, attn_temp: float = 1.0,
           block_size: int = 32, threshold: float | jax.Array = 1e-3, max_iter: int = 32, unroll: bool = False):
    """Block-wise Jacobi inversion of ``block`` (needs an SOS token). Returns ``(x, passes)``,
    ``passes`` the number of network passes over chunks (text prefill not counted)."""
    if block.sos_embed is None:
        raise ValueError("Jacobi sampling needs a model with an SOS token (sos=True); use sequential sampling")
    if max_iter < 1:
        raise ValueError(f"jacobi_max_iter must be >= 1, got {max_iter}")
    dec = _Decoder(block, unroll)
    z, frames, prefix, rope, _, cache = _setup(dec, z_img, y, guidance, attn_temp)
    b, n, c = z.shape
    frame = n // frames
    sos = jnp.broadcast_to(block.sos_embed[...].astype(jnp.float32), (b, 1, c))
    x_full = jnp.concatenate([sos, z], axis=1)  # slot j + 1 holds token j; first iterate: z
    threshold = jnp.asarray(threshold, jnp.float32)

    def run_chunk(start, size, carry):
        x_full, cache, passes = carry

        def cond(s):
            i, done = s[0], s[1]
            return (i < max_iter) & jnp.logical_not(done)

        def body(s):
            i, _, x_full, cache = s
            block, layers = dec.modules()
            src = jnp.where((i == 0) & (start > frame), start - frame, start)
            tok = jax.lax.dynamic_slice_in_dim(x_full, src, size, 1)
            scale, shift, cache = _predict(dec, block, layers, tok, cache, rope, prefix + start, 0, start,
                                           attn_temp, guidance)
            new = affine.affine_inverse(jax.lax.dynamic_slice_in_dim(z, start, size, 1), scale, shift)
            old = jax.lax.dynamic_slice_in_dim(x_full, start + 1, size, 1)
            diff = jnp.mean(jnp.square(new - old)) / jnp.mean(jnp.square(new))
            x_full = jax.lax.dynamic_update_slice_in_dim(x_full, new, start + 1, 1)
            return i + 1, diff < threshold, x_full, cache

        i, _, x_full, cache = jax.lax.while_loop(cond, body, (jnp.int32(0), jnp.bool_(False), x_full, cache))
        return x_full, cache, passes + i

    carry = (x_full, cache, jnp.int32(0))
    for first, size, count in jacobi_schedule(n, frame, block_size):
        if count == 1:
            carry = run_chunk(jnp.int32(first), size, carry)
        else:
            carry = jax.lax.fori_loop(0, count, lambda k, c, first=first, size=size:
                                      run_chunk(first + k * size, size, c), carry)
    x_full, _, passes = carry
    return _finish(block, x_full[:, 1:], z_img, frames, guidance), passes
