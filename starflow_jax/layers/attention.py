"""Multi-head attention with grouped-query heads, QK-norm, RoPE and post-norm."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from starflow_jax.layers.linear import apply_split_dense, dense
from starflow_jax.layers.norms import RMSNorm, make_norm
from starflow_jax.layers.platform import target_platform
from starflow_jax.layers.rope import apply_rope
from starflow_jax.layers.splash import splash_attention

ATTENTION_IMPLS = ("auto", "xla", "per_head", "blocked", "splash")


def resolve_attention(impl: str) -> str:
    """``auto``: the Pallas splash kernel on TPU, ``per_head`` on the CPU, ``xla`` elsewhere
    (cuDNN's fused attention on GPU where it applies); the others as named."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    if impl == "auto":
        return {"tpu": "splash", "cpu": "per_head"}.get(target_platform(), "xla")
    return impl


def _valid_mask(b: int, heads: int, lq: int, lk: int, causal: bool, mask) -> jax.Array | None:
    """``mask`` (``(q, k)`` or broadcastable to ``(b, heads, q, k)``) and the causal rule
    (query ``i`` sees keys ``<= i + lk - lq``) as one boolean array, or ``None``."""
    valid = None
    if mask is not None:
        valid = mask if mask.ndim == 2 else jnp.broadcast_to(mask, (b, heads, lq, lk))
    if causal:
        tri = jnp.tril(jnp.ones((lq, lk), bool), lk - lq)
        valid = tri if valid is None else valid & tri
    return valid


def per_head_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float, causal: bool, mask: jax.Array | None = None
) -> jax.Array:
    """Softmax attention written head by head (the heads unrolled; per head two matmuls
    batched over the batch only, scores and softmax in float32, masked scores set to a
    large negative number as ``jax.nn.dot_product_attention`` does). Same arguments and
    result as ``dot_product_attention``. On the CPU, XLA runs these matmuls about twice as
    fast as the ``(batch, heads)``-batched ones of the fused form (``docs/performance.md``:
    an attention layer's forward and backward pass 26 -> 17 ms at ``configs/bench_s.py``);
    the program grows with the number of heads."""
    b, lq, heads, d = q.shape
    lk, kv = k.shape[1], k.shape[2]
    g = heads // kv
    valid = _valid_mask(b, heads, lq, lk, causal, mask)
    big_negative = jnp.float32(-0.7 * np.finfo(np.float32).max)
    outs = []
    for i in range(heads):
        s = jnp.einsum("bqd,bkd->bqk", q[:, :, i], k[:, :, i // g], preferred_element_type=jnp.float32) * scale
        if valid is not None:
            s = jnp.where(valid if valid.ndim == 2 else valid[:, i], s, big_negative)
        p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
        outs.append(jnp.einsum("bqk,bkd->bqd", p, v[:, :, i // g]))
    return jnp.stack(outs, axis=2).astype(q.dtype)


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float,
    causal: bool,
    mask: jax.Array | None = None,
    impl: str = "xla",
    block: int = 512,
) -> jax.Array:
    """Softmax attention over ``(b, seq, heads, head_dim)`` arrays; ``k``/``v`` may have
    fewer heads than ``q`` (grouped-query: query head ``i`` reads kv head
    ``i // (heads / kv_heads)``). ``mask`` is boolean ``(q_len, k_len)`` (or broadcastable
    to ``(b, heads, q_len, k_len)``), ``True`` where a query may attend.

    ``impl``: ``"xla"``, ``jax.nn.dot_product_attention`` (XLA's fused attention; cuDNN on
    GPU where it applies), materialising the ``(b, heads, q, k)`` scores; ``"blocked"``,
    keys and values in blocks of ``block`` with an online softmax (``blocked_attention``):
    memory linear in the sequence, for long sequences (video) on any backend;
    ``"per_head"``, the heads unrolled (``per_head_attention``: the fastest form on the
    CPU); ``"splash"``, the Pallas TPU splash kernel (``layers.splash``; interpreted off
    TPU); ``"auto"``: see ``resolve_attention``."""
    impl = resolve_attention(impl)
    if impl == "splash":
        return splash_attention(q, k, v, scale=scale, causal=causal, mask=mask)
    if mask is not None and not isinstance(mask, jax.Array):
        mask = jnp.asarray(np.asarray(mask))
    if impl == "blocked":
        if mask is not None and mask.ndim != 2:
            raise ValueError("blocked attention takes a (q_len, k_len) mask")
        return blocked_attention(q, k, v, scale=scale, causal=causal, mask=mask, block=block)
    if impl == "per_head":
        return per_head_attention(q, k, v, scale=scale, causal=causal, mask=mask)
    if mask is not None:
        b, lq, heads, _ = q.shape
        full = (b, heads, lq, k.shape[1])
        mask, causal = jnp.broadcast_to(_valid_mask(*full, causal, mask), full), False
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=causal)


def blocked_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float,
    causal: bool,
    mask: jax.Array | None = None,
    block: int = 512,
) -> jax.Array:
    """Attention with keys / values in blocks of ``block`` slots and an online softmax
    (running max and sum in float32), scanned over the blocks; each block step is
    rematerialised, so neither the forward nor the backward pass holds more than one
    block of scores. Same arguments and result as ``dot_product_attention``."""
    b, lq, heads, d = q.shape
    lk, kv = k.shape[1], k.shape[2]
    g = heads // kv
    n_blocks = -(-lk // block)
    pad = n_blocks * block - lk
    valid = _valid_mask(b, heads, lq, lk, causal, None if mask is None else jnp.broadcast_to(mask, (lq, lk)))
    valid = jnp.ones((lq, lk), bool) if valid is None else valid
    if pad:
        k = jnp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0)))
        valid = jnp.pad(valid, ((0, 0), (0, pad)))
    qg = q.reshape(b, lq, kv, g, d)
    kb = k.reshape(b, n_blocks, block, kv, d).swapaxes(0, 1)
    vb = v.reshape(b, n_blocks, block, kv, d).swapaxes(0, 1)
    mb = valid.reshape(lq, n_blocks, block).swapaxes(0, 1)

    @jax.checkpoint
    def step(carry, xs):
        m, l, acc = carry
        kj, vj, mj = xs
        s = jnp.einsum("bqkgd,bskd->bkgqs", qg, kj, preferred_element_type=jnp.float32) * scale
        s = jnp.where(mj[None, None, None], s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.exp(s - m_safe[..., None])
        corr = jnp.exp(jnp.where(jnp.isfinite(m), m - m_safe, -jnp.inf))
        l = l * corr + p.sum(-1)
        acc = acc * corr[..., None] + jnp.einsum(
            "bkgqs,bskd->bkgqd", p.astype(vj.dtype), vj, preferred_element_type=jnp.float32
        )
        return (m_new, l, acc), None

    init = (
        jnp.full((b, kv, g, lq), -jnp.inf, jnp.float32),
        jnp.zeros((b, kv, g, lq), jnp.float32),
        jnp.zeros((b, kv, g, lq, d), jnp.float32),
    )
    (_, l, acc), _ = jax.lax.scan(step, init, (kb, vb, mb))
    out = acc / jnp.where(l > 0, l, 1.0)[..., None]  # a query that sees nothing gives 0
    return out.transpose(0, 3, 1, 2, 4).reshape(b, lq, heads, d).astype(q.dtype)


def cached_attention(
    q: jax.Array,
    ks: Sequence[jax.Array],
    vs: Sequence[jax.Array],
    first_slots: Sequence[int],
    start: jax.Array,
    scale: float,
) -> jax.Array:
    """Attention of queries ``(b, m, heads, head_dim)`` at slots ``start..start+m-1`` over
    a KV cache held in consecutive chunks ``ks[j]``, ``vs[j]`` of shape ``(b, kv_heads,
    slots_j, head_dim)`` (head-major: both products are plain batched matmuls), chunk
    ``j`` holding the slots from ``first_slots[j]`` on, the new slots already written;
    query slot ``start + i`` reads the slots ``<= start + i``. Only the chunks passed are
    read: a caller that knows the queries lie in the first chunks passes only those.
    Scores and softmax in float32."""
    b, m, heads, d = q.shape
    kv = ks[0].shape[1]
    g = heads // kv
    # (b, m, kv, g, d) -> (b, kv, g * m, d): query head kv_i * g + g_i reads kv head kv_i
    qg = q.reshape(b, m, kv, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * m, d)
    s = [jnp.einsum("bkqd,bksd->bkqs", qg, k.astype(q.dtype), preferred_element_type=jnp.float32) for k in ks]
    s = (s[0] if len(s) == 1 else jnp.concatenate(s, axis=-1)) * scale
    slot = np.concatenate([np.arange(f, f + k.shape[2]) for f, k in zip(first_slots, ks)])
    pos = start + jnp.tile(jnp.arange(m), g)
    s = jnp.where(jnp.asarray(slot)[None, :] <= pos[:, None], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1).astype(q.dtype)
    o, at = None, 0
    for v in vs:
        n = v.shape[2]
        part = jnp.einsum("bkqs,bksd->bkqd", p[..., at : at + n] if len(vs) > 1 else p, v.astype(q.dtype))
        o, at = (part if o is None else o + part), at + n
    return o.reshape(b, kv, g, m, d).transpose(0, 3, 1, 2, 4).reshape(b, m, heads, d)


class Attention(nnx.Module):
    def __init__(
        self,
        channels: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        *,
        norm_type: str,
        use_qk_norm: bool,
        use_post_norm: bool,
        use_bias: bool,
        hf_style_rope: bool,
        causal: bool,
        dtype,
        param_dtype,
        rngs: nnx.Rngs,
        attention_impl: str = "xla",
        attention_block: int = 512,
    ):
        self.head_dim = head_dim
        self.attention_impl = attention_impl
        self.attention_block = attention_block
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.hf_style_rope = hf_style_rope
        self.causal = causal
        q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
        self.norm = make_norm(norm_type, channels, param_dtype)
        kw = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        # heads over ``tensor``: qkv column-parallel, the output projection row-parallel
        self.qkv = dense(channels, q_size + 2 * kv_size, kernel_axes=("embed", "heads"), bias_axes=("heads",), **kw)
        self.proj = dense(q_size, channels, kernel_axes=("heads", "embed"), bias_axes=("features",), **kw)
        self.query_norm = RMSNorm(head_dim, param_dtype=param_dtype) if use_qk_norm else None
        self.key_norm = RMSNorm(head_dim, param_dtype=param_dtype) if use_qk_norm else None
        self.post_norm = RMSNorm(channels, param_dtype=param_dtype) if use_post_norm else None

    def qkv_heads(self, x: jax.Array, rope: tuple[jax.Array, jax.Array] | None, split=None):
        """Project ``(b, seq, c)`` to rotated, normalised ``q, k, v`` heads (``split``: the
        qkv weights cut by ``linear.split_dense``, decoding only)."""
        b, t, _ = x.shape
        h = self.norm(x) if self.norm is not None else x
        qkv = self.qkv(h) if split is None else jnp.concatenate(apply_split_dense(h, split), axis=-1)
        qkv = checkpoint_name(qkv, "qkv_proj")
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q = qkv[..., :q_size].reshape(b, t, self.num_heads, self.head_dim)
        k = qkv[..., q_size : q_size + kv_size].reshape(b, t, self.num_kv_heads, self.head_dim)
        v = qkv[..., q_size + kv_size :].reshape(b, t, self.num_kv_heads, self.head_dim)
        if self.query_norm is not None:
            q, k = self.query_norm(q), self.key_norm(k)
        if rope is not None:
            cos, sin = rope
            # tables twice head_dim wide: the queries' rotations, then the keys' (a model
            # whose keys sit at the position of the token they hold: ``rope_content_keys``)
            cos_k, sin_k = cos, sin
            if cos.shape[-1] == 2 * self.head_dim:
                cos, cos_k = cos[..., : self.head_dim], cos[..., self.head_dim :]
                sin, sin_k = sin[..., : self.head_dim], sin[..., self.head_dim :]
            q = apply_rope(q, cos, sin, self.hf_style_rope)
            k = apply_rope(k, cos_k, sin_k, self.hf_style_rope)
        return q, k, v

    def output(self, o: jax.Array, split=None) -> jax.Array:
        b, t = o.shape[:2]
        o = o.reshape(b, t, self.num_heads * self.head_dim)
        out = self.proj(o) if split is None else jnp.concatenate(apply_split_dense(o, split), axis=-1)
        out = checkpoint_name(out, "attn_out_proj")
        return self.post_norm(out) if self.post_norm is not None else out

    def cached(
        self,
        x: jax.Array,
        rope,
        cache: Sequence[tuple[jax.Array, jax.Array]],
        first_slots: Sequence[int],
        start: jax.Array,
        write: int = 0,
        temp: float = 1.0,
        split: dict | None = None,
    ):
        """Causal attention of ``m`` new slots starting at slot ``start`` over a KV cache in
        chunks ``[(k, v), ...]`` (see ``cached_attention``; a single chunk is a plain
        cache): the new keys and values (rotated) are written into chunk ``write`` (which
        must hold slots ``start..start+m-1``) and every new slot attends to the slots up to
        itself in chunks ``0..write``. ``rope`` holds the tables of the new slots;
        ``split``: ``{"qkv", "proj"}`` weights cut by ``linear.split_dense``. Returns
        ``(out, cache)``."""
        split = split or {}
        q, k, v = self.qkv_heads(x, rope, split.get("qkv"))
        zero = jnp.zeros((), jnp.int32)
        at = (zero, zero, start - first_slots[write], zero)
        ck, cv = cache[write]
        ck = jax.lax.dynamic_update_slice(ck, k.transpose(0, 2, 1, 3).astype(ck.dtype), at)
        cv = jax.lax.dynamic_update_slice(cv, v.transpose(0, 2, 1, 3).astype(cv.dtype), at)
        cache = list(cache)
        cache[write] = (ck, cv)
        read = cache[: write + 1]
        o = cached_attention(
            q, [c[0] for c in read], [c[1] for c in read], first_slots, start, self.head_dim**-0.5 / temp
        )
        return self.output(o, split.get("proj")), cache

    def __call__(self, x: jax.Array, rope=None, mask: jax.Array | None = None, temp: float = 1.0) -> jax.Array:
        q, k, v = self.qkv_heads(x, rope)
        o = dot_product_attention(
            q,
            k,
            v,
            scale=self.head_dim**-0.5 / temp,
            causal=self.causal,
            mask=mask,
            impl=self.attention_impl,
            block=self.attention_block,
        )
        return self.output(o)
