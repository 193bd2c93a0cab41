"""Inverting one flow block (noise to data), inside ``jax.jit``.

Both inversions keep a preallocated KV cache per layer, ``(layers, b, kv_heads, slots,
head_dim)`` with ``slots = text + tokens``, carried as a pytree through ``lax`` loops;
the text prefix is written once.

* ``sequential``: one network pass per token (``lax.fori_loop``).
* ``jacobi``: the sequence is cut into chunks; each chunk is iterated to a fixed point
  (``lax.while_loop``) with all its tokens updated in parallel per pass, until the
  relative mean squared change falls under ``jacobi_th`` or ``jacobi_max_iter`` passes
  were made. For video, the chunks after the first frame are 4x larger and a chunk's
  first iterate reads the tokens one frame earlier (the reference's video-aware schedule).
Both land on the same fixed point.

Two video extensions (models with an SOS token), both as the reference does them:

* a **given prefix** (``given``: the block's input for the first frames, image-to-video /
  video-to-video): those tokens are kept, their keys and values written into the cache by
  one pass over ``[SOS, given[:-1]]`` (what the reference's ``forward_context`` leaves in
  the cache), and sampling continues after them;
* a **sliding window** (``window`` frames, ``context`` frames): the cache holds one window;
  when the generated tokens reach its end, the last ``context`` frames are re-encoded as a
  fresh sequence ``[SOS, context[:-1]]`` at the start of the cache and sampling goes on,
  ``window - context`` new frames per window. Window ``k`` is the sequence of tokens
  ``[base_k, end_k)`` read from cache slot 0 (RoPE positions restart there); the windows
  after the first share one compiled body (``lax.fori_loop``), so the program does not
  grow with the video's length.
"""

from __future__ import annotations

import contextlib
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from starflow_jax.flow import affine
from starflow_jax.flow.guidance import guide_doubled_batch
from starflow_jax.layers.transformer import apply_layers_cached, apply_stack_cached, unstack_layers
from starflow_jax.model.flow_block import FlowBlock, block_rope

_PROGRESS_HOOKS: list = []
JACOBI_POLICIES = ("blockwise", "adaptive")
JACOBI_INITS = ("noise", "zeros", "previous")


@contextlib.contextmanager
def progress_hook(fn):
    """While active, inversions run with ``progress=True`` call ``fn(done_tokens, total)``
    from inside the compiled loop (``jax.debug.callback``): after every frame of tokens
    (sequential) or every chunk (Jacobi)."""
    _PROGRESS_HOOKS.append(fn)
    try:
        yield
    finally:
        _PROGRESS_HOOKS.pop()


def _report(done, total):
    if _PROGRESS_HOOKS:
        _PROGRESS_HOOKS[-1](int(done), int(total))


def resolve_unroll(unroll: bool | None) -> bool:
    """``None`` (auto): unroll the layers inside the token loop on the CPU, where a matmul
    cannot read a dynamic slice of the stacked weights in place (each scanned layer step
    would copy its weights and cache), and keep them scanned elsewhere (TPU, GPU), where
    the program then stays the same size whatever the depth."""
    return jax.default_backend() == "cpu" if unroll is None else bool(unroll)


def resolve_splits(splits: int | None, unroll: bool) -> int:
    """``None`` (auto): with unrolled layers on the CPU, sequential decoding runs every
    projection as 2 independent matmuls. XLA:CPU runs a matmul of a few rows (one token
    of a batch) on one thread but independent operations concurrently, so two halves
    stream the weights on both cores (a 6-layer chain of 8-row matmuls: 0.37 -> 0.19 s,
    ``docs/performance.md``). Elsewhere 1 (one matmul per projection)."""
    if splits is None:
        return 2 if unroll and jax.default_backend() == "cpu" else 1
    return int(splits)  # sample() checks SamplingOptions.matmul_splits >= 1


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

    def __init__(self, block: FlowBlock, unroll: bool, splits: int = 1):
        self.block = block
        self.graphdef, self.state = nnx.split(block)
        layers = unstack_layers(block.attn_blocks, block.num_layers) if unroll else None
        self.layers = None if layers is None else [nnx.split(layer) for layer in layers]
        # unrolled layers may run each projection as ``splits`` independent matmuls (see
        # ``resolve_splits``), the weights cut once, here, outside the loops
        self.splits = [layer.split_weights(splits) for layer in layers] if layers and splits > 1 else None
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
        return [
            [(chunk(hi - lo), chunk(hi - lo)) for lo, hi in zip(slots[:-1], slots[1:])]
            for _ in range(self.block.num_layers)
        ]

    def layers_cached(self, block: FlowBlock, layers, h, rope, cache, slot, write: int, attn_temp: float):
        if layers is None:
            h, ck, cv = apply_stack_cached(block.attn_blocks, h, rope, cache[0], cache[1], slot, attn_temp)
            return h, (ck, cv)
        return apply_layers_cached(layers, h, rope, cache, self.first_slots, slot, write, attn_temp, self.splits)


def window_plan(n: int, frame: int, given: int, window: int | None, context: int | None) -> list[tuple[int, int, int]]:
    """The windows ``(base, start, end)`` (token indices): window ``k`` reads tokens
    ``[base, end)`` as one sequence, the first ``start - base`` of them known (the given
    prefix, or the re-encoded context), and generates ``[start, end)``. ``window`` and
    ``context`` count frames of ``frame`` tokens; ``given`` counts tokens."""
    if not 0 <= given <= n:
        raise ValueError(f"the given prefix has {given} tokens, the sequence {n}")
    if window is None:
        return [(0, given, n)]
    if window < 2:
        raise ValueError(f"a sliding attention window needs at least 2 frames, got {window}")
    if context is None or not 1 <= context < window:
        raise ValueError(f"the re-encoded context must hold 1 to {window - 1} frames (window {window}), got {context}")
    w, c = window * frame, context * frame
    if given > w:
        raise ValueError(f"the given frames ({given // frame}) exceed the attention window ({window} frames)")
    plan = [(0, given, min(n, w))]
    while plan[-1][2] < n:
        start = plan[-1][2]
        plan.append((start - c, start, min(n, start - c + w)))
    return plan


def _runs(items: list[tuple[int, ...]], key) -> list[tuple[tuple[int, ...], int]]:
    """Consecutive items with equal ``key`` grouped as ``(first item, count)``."""
    runs: list[list] = []
    for it in items:
        if runs and key(runs[-1][0]) == key(it):
            runs[-1][1] += 1
        else:
            runs.append([it, 1])
    return [(tuple(r[0]), r[1]) for r in runs]


def _setup(
    dec: _Decoder,
    z_img: jax.Array,
    y,
    guidance: float,
    attn_temp: float,
    token_slots: int | None = None,
    segments: int = 1,
):
    """Tokens in reading order (batch doubled under guidance), the RoPE table, the token
    segment bounds, and a KV cache of ``token_slots`` token slots (default: all tokens)
    with the text prefix already written."""
    block = dec.block
    seq, frames = block.tokens(z_img.astype(jnp.float32))
    if guidance > 0:
        seq = jnp.concatenate([seq, seq], axis=0)
    b, n, _ = seq.shape
    txt = block.text_prefix(y)
    if txt is not None and txt.shape[0] != b:
        raise ValueError(
            f"conditioning has batch {txt.shape[0]}, sampling needs {b}"
            + (" (guidance doubles the batch: pass concat([y, y_null]))" if guidance > 0 else "")
        )
    prefix = 0 if txt is None else txt.shape[1]
    rope = block_rope(block.cfg, block.spec.head_dim, z_img.shape, prefix, block.conditioned)
    bounds = token_segments(token_slots or n, segments if dec.layers is not None else 1)
    cache = dec.empty_cache(b, prefix, bounds)
    if txt is not None:
        r = None if rope is None else (rope[0][:prefix], rope[1][:prefix])
        blk, layers = dec.modules()
        _, cache = dec.layers_cached(
            blk, layers, txt.astype(jnp.dtype(block.spec.dtype)), r, cache, jnp.int32(0), 0, attn_temp
        )
    return seq, frames, prefix, rope, bounds, cache


def _rope_rows(rope, start, m):
    if rope is None:
        return None
    return (jax.lax.dynamic_slice_in_dim(rope[0], start, m, 0), jax.lax.dynamic_slice_in_dim(rope[1], start, m, 0))


def _hidden(dec: _Decoder, block: FlowBlock, layers, tokens_in, cache, rope, slot, write, pos_index, attn_temp):
    """The layers over ``m`` input tokens written at cache slot ``slot``: hidden states and
    the new cache."""
    m = tokens_in.shape[1]
    h = block.proj_in(tokens_in.astype(block.proj_in.kernel[...].dtype))
    if block.pos_embed is not None:
        h = h + jax.lax.dynamic_slice_in_dim(block.pos_embed[...], pos_index, m, 0)[None].astype(h.dtype)
    return dec.layers_cached(block, layers, h, _rope_rows(rope, slot, m), cache, slot, write, attn_temp)


def _predict(
    dec: _Decoder, block: FlowBlock, layers, tokens_in, cache, rope, slot, write, pos_index, attn_temp, guidance
):
    """One network pass over ``m`` input tokens at cache slot ``slot`` (in cache chunk
    ``write``): the inverse step's ``(scale, shift)`` for the ``m`` tokens they predict,
    and the new cache."""
    h, cache = _hidden(dec, block, layers, tokens_in, cache, rope, slot, write, pos_index, attn_temp)
    if block.final_norm is not None:
        h = block.final_norm(h)
    raw = affine.soft_clip(block.proj_out(h), block.cfg.soft_clip)
    a, b = affine.split_raw(raw)
    scale = affine.scale_from_raw(a, block.cfg.use_softplus)
    if guidance > 0:
        scale, b = guide_doubled_batch(scale, b, guidance)
    return scale, b, cache


def _encode_known(dec: _Decoder, x_full, cache, rope, prefix: int, base, count: int, sos, attn_temp):
    """Write the keys and values of the known tokens ``[base, base + count)`` into cache
    slots ``prefix..`` as the start of a fresh sequence: one pass over
    ``[SOS, tokens base .. base + count - 2]`` (``x_full`` slot ``j + 1`` holds token ``j``)."""
    block, layers = dec.modules()
    inp = jax.lax.dynamic_slice_in_dim(x_full, base, count, 1)
    inp = jnp.concatenate([sos, inp[:, 1:]], axis=1)
    _, cache = _hidden(dec, block, layers, inp, cache, rope, jnp.int32(prefix), 0, 0, attn_temp)
    return cache


def _finish(block, x, z_img, frames, guidance):
    if guidance > 0:
        x = x[: x.shape[0] // 2]
    return block.untokens(x, z_img.shape, frames)


def _check_block_positions(block: FlowBlock, n: int):
    if block.pos_embed is not None and block.pos_embed.shape[0] != n:
        raise ValueError(f"learned position embeddings cover {block.pos_embed.shape[0]} tokens, sampling {n}")


def _start_sequence(block: FlowBlock, z, z_img, given, frames: int, window, guidance):
    """``x_full`` (``(b, n + 1, c)``: SOS then the first iterate ``z`` with the given
    tokens written in), the SOS row, the frame size and the given token count."""
    b, n, c = z.shape
    frame = n // frames
    if (given is not None or window is not None) and block.sos_embed is None:
        raise ValueError("a given prefix or a sliding attention window needs a model with an SOS token (sos=True)")
    if window is not None and block.pos_embed is not None:
        raise ValueError("a sliding attention window needs RoPE positions (rope=True)")
    sos = jnp.broadcast_to(block.sos_embed[...].astype(jnp.float32), (b, 1, c))
    x_full = jnp.concatenate([sos, z], axis=1)
    n_given = 0
    if given is not None:
        if (
            given.ndim != z_img.ndim
            or given.shape[0] != z_img.shape[0]
            or given.shape[2:] != z_img.shape[2:]
            or z_img.ndim != 5
        ):
            raise ValueError(
                f"given frames {tuple(given.shape)} do not match the video {tuple(z_img.shape)} "
                "(same batch, frame size and channels; a video model)"
            )
        if given.shape[1] > frames:
            raise ValueError(f"{given.shape[1]} given frames exceed the {frames} frames sampled")
        if not block.keeps_frame_order(frames):
            raise ValueError(
                "this block does not read the frames in time order (temporal_causal=0 with a "
                "flip order): a given first frame is not a prefix of its sequence"
            )
        g, _ = block.tokens(given.astype(jnp.float32))
        if guidance > 0:
            g = jnp.concatenate([g, g], axis=0)
        n_given = g.shape[1]
        x_full = jax.lax.dynamic_update_slice_in_dim(x_full, g, 1, 1)
    return x_full, sos, frame, n_given


def _window_loop(plan, run_window, carry):
    """Run ``run_window(base, start, end_minus_start, carry)`` over the windows of ``plan``;
    consecutive windows of the same shape share one ``lax.fori_loop`` body."""
    for (base, start, end), count in _runs(plan, key=lambda w: (w[1] - w[0], w[2] - w[1])):
        known, new = start - base, end - start
        if count == 1:
            carry = run_window(jnp.int32(base), known, new, carry)
        else:
            step = new  # consecutive uniform windows advance by their new tokens
            carry = jax.lax.fori_loop(
                0,
                count,
                lambda k, c, base=base, known=known, new=new, step=step: run_window(base + k * step, known, new, c),
                carry,
            )
    return carry


@functools.partial(
    nnx.jit, static_argnames=("guidance", "attn_temp", "unroll", "segments", "window", "context", "progress", "splits")
)
def sequential(
    block: FlowBlock,
    z_img: jax.Array,
    y=None,
    given=None,
    *,
    guidance: float = 0.0,
    attn_temp: float = 1.0,
    unroll: bool = False,
    segments: int = 1,
    window: int | None = None,
    context: int | None = None,
    progress: bool = False,
    splits: int = 1,
):
    """Autoregressive inversion of ``block``: ``z_img`` (patchified, block input shape) to
    the block's input. Returns ``(x, passes)``. ``unroll``: see ``resolve_unroll``;
    ``segments`` (unrolled, no prefix or window): the token loop runs in that many
    segments, each reading only the KV cache written so far (see ``_Decoder``);
    ``given`` / ``window`` / ``context``: see the module docstring; ``progress``: report
    every frame to ``progress_hook`` (models with an SOS token); ``splits`` (unrolled):
    each projection as that many independent matmuls (``resolve_splits``)."""
    if block.sos_embed is None:
        if given is not None or window is not None:
            raise ValueError("a given prefix or a sliding attention window needs a model with an SOS token (sos=True)")
        return _sequential_shifted(
            block, z_img, y, guidance=guidance, attn_temp=attn_temp, unroll=unroll, segments=segments, splits=splits
        )
    dec = _Decoder(block, unroll, splits)
    n_tok = math.prod(z_img.shape[1:-1])
    frames = z_img.shape[1] if z_img.ndim == 5 else 1
    plain = given is None and window is None
    slots = n_tok if window is None else min(n_tok, window * (n_tok // frames))
    z, frames, prefix, rope, bounds, cache = _setup(dec, z_img, y, guidance, attn_temp, slots, segments if plain else 1)
    _check_block_positions(block, z.shape[1])
    x_full, sos, frame, n_given = _start_sequence(block, z, z_img, given, frames, window, guidance)
    plan = window_plan(z.shape[1], frame, n_given, window, context)

    def body(t, carry, base, write):
        x_full, cache = carry
        block, layers = dec.modules()
        tok = jax.lax.dynamic_slice_in_dim(x_full, t, 1, 1)  # token t - 1 (SOS for t = 0)
        scale, shift, cache = _predict(
            dec, block, layers, tok, cache, rope, prefix + t - base, write, t - base, attn_temp, guidance
        )
        new = affine.affine_inverse(jax.lax.dynamic_slice_in_dim(z, t, 1, 1), scale, shift)
        if progress:
            jax.lax.cond((t + 1) % frame == 0, lambda: jax.debug.callback(_report, t + 1, z.shape[1]), lambda: None)
        return jax.lax.dynamic_update_slice_in_dim(x_full, new, t + 1, 1), cache

    def run_window(base, known, new, carry):
        x_full, cache, passes = carry
        if known:
            cache = _encode_known(dec, x_full, cache, rope, prefix, base, known, sos, attn_temp)
            passes = passes + 1
        lo = base + known
        loop = (x_full, cache)
        if plain:
            for g, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
                loop = jax.lax.fori_loop(a, b, functools.partial(body, base=0, write=g), loop)
        else:
            loop = jax.lax.fori_loop(lo, lo + new, functools.partial(body, base=base, write=0), loop)
        return loop + (passes + new,)

    x_full, _, passes = _window_loop(plan, run_window, (x_full, cache, jnp.int32(0)))
    return _finish(block, x_full[:, 1:], z_img, frames, guidance), passes


def _sequential_shifted(block: FlowBlock, z_img, y, *, guidance, attn_temp, unroll, segments, splits):
    """Sequential inversion of a block without SOS token: token 0 is its own noise, token
    ``t + 1`` is predicted from tokens ``0..t``."""
    dec = _Decoder(block, unroll, splits)
    z, frames, prefix, rope, bounds, cache = _setup(dec, z_img, y, guidance, attn_temp, None, segments)
    _check_block_positions(block, z.shape[1])
    steps = z.shape[1] - 1

    def body(t, carry, write):
        x, cache = carry
        block, layers = dec.modules()
        tok = jax.lax.dynamic_slice_in_dim(x, t, 1, 1)
        scale, shift, cache = _predict(dec, block, layers, tok, cache, rope, prefix + t, write, t, attn_temp, guidance)
        new = affine.affine_inverse(jax.lax.dynamic_slice_in_dim(z, t + 1, 1, 1), scale, shift)
        return jax.lax.dynamic_update_slice_in_dim(x, new, t + 1, 1), cache

    carry = (z, cache)
    for g, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        hi = min(hi, steps)
        if hi > lo:
            carry = jax.lax.fori_loop(lo, hi, functools.partial(body, write=g), carry)
    return _finish(block, carry[0], z_img, frames, guidance), jnp.int32(steps)


def jacobi_schedule(start: int, end: int, frame: int, block_size: int) -> list[tuple[int, int, int]]:
    """Chunks of tokens ``[start, end)`` as runs ``(first_start, size, count)`` of
    equal-size consecutive chunks: ``block_size`` tokens while the chunk starts within the
    first frame (or at its end), ``4 * block_size`` after, the last chunk cut at ``end``."""
    if block_size <= 0:
        raise ValueError(f"jacobi_block_size must be positive, got {block_size}")
    chunks = []
    while start < end:
        size = block_size if start <= frame else 4 * block_size
        size = min(size, end - start)
        chunks.append((start, size))
        start += size
    return [(first, size, count) for (first, size), count in _runs(chunks, key=lambda c: c[1])]


@functools.partial(
    nnx.jit,
    static_argnames=(
        "guidance",
        "attn_temp",
        "block_size",
        "max_iter",
        "unroll",
        "window",
        "context",
        "progress",
        "policy",
        "init",
    ),
)
def jacobi(
    block: FlowBlock,
    z_img: jax.Array,
    y=None,
    given=None,
    *,
    guidance: float = 0.0,
    attn_temp: float = 1.0,
    block_size: int = 32,
    threshold: float | jax.Array = 1e-3,
    max_iter: int = 32,
    unroll: bool = False,
    window: int | None = None,
    context: int | None = None,
    progress: bool = False,
    policy: str = "blockwise",
    init: str = "noise",
):
    """Jacobi inversion of ``block`` (needs an SOS token). Returns ``(x, passes)``,
    ``passes`` the number of network passes over chunks (text prefill not counted; the
    passes writing a given prefix or a re-encoded context counted). ``given`` /
    ``window`` / ``context``: see the module docstring.

    ``policy="blockwise"``: the reference's fixed chunks (``block_size`` tokens, 4x after
    the first frame), each iterated until its relative mean squared change is under
    ``threshold`` or ``max_iter`` passes were made. ``policy="adaptive"``: a window of
    ``block_size`` tokens that advances past every token known to be final after each pass:
    the window's first token (its inputs are all final), and each next one while the tokens
    before it did not change in the pass by more than ``threshold`` times the sample's mean
    square (per sample; the batch advances by its smallest advance). At ``threshold=0`` it
    gives sequential decoding's result, and it never makes more passes than there are
    tokens. ``init``: the first iterate of the tokens not yet sampled, the prior noise
    ``z`` (``"noise"``, the reference's), ``"zeros"``, or (adaptive, video) ``"previous"``:
    each token, when the window first reaches it, starts from the token one frame earlier
    (the first frame, and single frames, from the noise)."""
    if policy not in JACOBI_POLICIES:
        raise ValueError(f"jacobi policy must be 'blockwise' or 'adaptive', got {policy!r}")
    if init not in JACOBI_INITS:
        raise ValueError(f"jacobi init must be one of {', '.join(JACOBI_INITS)}, got {init!r}")
    if init == "previous" and policy != "adaptive":
        raise ValueError(
            "jacobi init 'previous' is the adaptive policy's; the block-wise schedule already starts each "
            "chunk after the first frame from the tokens one frame earlier (the reference's rule)"
        )
    if block_size < 1:
        raise ValueError(f"jacobi_block_size must be positive, got {block_size}")
    if block.sos_embed is None:
        raise ValueError("Jacobi sampling needs a model with an SOS token (sos=True); use sequential sampling")
    if max_iter < 1:
        raise ValueError(f"jacobi_max_iter must be >= 1, got {max_iter}")
    dec = _Decoder(block, unroll)
    n_tok = math.prod(z_img.shape[1:-1])
    frames = z_img.shape[1] if z_img.ndim == 5 else 1
    slots = n_tok if window is None else min(n_tok, window * (n_tok // frames))
    z, frames, prefix, rope, _, cache = _setup(dec, z_img, y, guidance, attn_temp, slots)
    x_full, sos, frame, n_given = _start_sequence(block, z, z_img, given, frames, window, guidance)
    if init == "zeros":
        x_full = x_full.at[:, 1 + n_given :].set(0.0)
    plan = window_plan(z.shape[1], frame, n_given, window, context)
    threshold = jnp.asarray(threshold, jnp.float32)

    def run_adaptive(lo, count: int, base, carry):
        """Tokens ``[lo, lo + count)`` by the adaptive window (``count`` static)."""
        width = min(block_size, count)
        hi = lo + count

        def body(s):
            pos, filled, x_full, cache, passes = s
            start = jnp.minimum(pos, hi - width)  # the last windows end at hi
            block, layers = dec.modules()
            if init == "previous" and frames > 1:
                # inputs never iterated yet (x_full rows past `filled`) start from the same
                # token one frame earlier, as it is now
                q = start + jnp.arange(width)
                fresh = ((q > filled) & (q > frame))[None, :, None]
                prev = jnp.take(x_full, jnp.maximum(q - frame, 0), axis=1)
                cur = jax.lax.dynamic_slice_in_dim(x_full, start, width, 1)
                x_full = jax.lax.dynamic_update_slice_in_dim(x_full, jnp.where(fresh, prev, cur), start, 1)
            tok = jax.lax.dynamic_slice_in_dim(x_full, start, width, 1)
            scale, shift, cache = _predict(
                dec, block, layers, tok, cache, rope, prefix + start - base, 0, start - base, attn_temp, guidance
            )
            new = affine.affine_inverse(jax.lax.dynamic_slice_in_dim(z, start, width, 1), scale, shift)
            old = jax.lax.dynamic_slice_in_dim(x_full, start + 1, width, 1)
            change = jnp.mean(jnp.square(new - old), axis=-1)  # (b, width)
            still = change <= threshold * jnp.mean(jnp.square(new), axis=(1, 2))[:, None]
            still = still | (jnp.arange(width) < pos - start)[None]  # tokens before pos are final
            lead = jnp.sum(jnp.cumprod(still.astype(jnp.int32), axis=1), axis=1)  # (b,)
            # final after this pass: window tokens 0 .. lead (each one's inputs did not change)
            reach = start + jnp.minimum(jnp.min(lead) + 1, width)
            x_full = jax.lax.dynamic_update_slice_in_dim(x_full, new, start + 1, 1)
            return reach, jnp.maximum(filled, start + width), x_full, cache, passes + 1

        x_full, cache, passes = carry
        lo = jnp.asarray(lo, jnp.int32)
        _, _, x_full, cache, passes = jax.lax.while_loop(lambda s: s[0] < hi, body, (lo, lo, x_full, cache, passes))
        if progress:
            jax.debug.callback(_report, hi, z.shape[1])
        return x_full, cache, passes

    def run_chunk(start, size, base, carry):
        x_full, cache, passes = carry

        def cond(s):
            i, done = s[0], s[1]
            return (i < max_iter) & jnp.logical_not(done)

        def body(s):
            i, _, x_full, cache = s
            block, layers = dec.modules()
            src = jnp.where((i == 0) & (start > frame), start - frame, start)
            tok = jax.lax.dynamic_slice_in_dim(x_full, src, size, 1)
            scale, shift, cache = _predict(
                dec, block, layers, tok, cache, rope, prefix + start - base, 0, start - base, attn_temp, guidance
            )
            new = affine.affine_inverse(jax.lax.dynamic_slice_in_dim(z, start, size, 1), scale, shift)
            old = jax.lax.dynamic_slice_in_dim(x_full, start + 1, size, 1)
            diff = jnp.mean(jnp.square(new - old)) / jnp.mean(jnp.square(new))
            x_full = jax.lax.dynamic_update_slice_in_dim(x_full, new, start + 1, 1)
            return i + 1, diff < threshold, x_full, cache

        i, _, x_full, cache = jax.lax.while_loop(cond, body, (jnp.int32(0), jnp.bool_(False), x_full, cache))
        if progress:
            jax.debug.callback(_report, start + size, z.shape[1])
        return x_full, cache, passes + i

    # Within a window the chunk schedule depends on the window's first generated token
    # (static for the first window; every later window starts past the first frame).
    def run_window(base, known, new, carry, first_start=None):
        x_full, cache, passes = carry
        if known:
            cache = _encode_known(dec, x_full, cache, rope, prefix, base, known, sos, attn_temp)
            passes = passes + 1
        lo = base + known
        static_lo = first_start if first_start is not None else max(frame + 1, known)
        carry = (x_full, cache, passes)
        if policy == "adaptive":
            return run_adaptive(lo, new, base, carry)
        for first, size, count in jacobi_schedule(static_lo, static_lo + new, frame, block_size):
            off = first - static_lo
            if count == 1:
                carry = run_chunk(lo + off, size, base, carry)
            else:
                carry = jax.lax.fori_loop(
                    0, count, lambda k, c, off=off, size=size: run_chunk(lo + off + k * size, size, base, c), carry
                )
        return carry

    first, rest = plan[0], plan[1:]
    carry = run_window(jnp.int32(0), first[1], first[2] - first[1], (x_full, cache, jnp.int32(0)), first_start=first[1])
    if rest:
        carry = _window_loop(rest, run_window, carry)
    x_full, _, passes = carry
    return _finish(block, x_full[:, 1:], z_img, frames, guidance), passes
