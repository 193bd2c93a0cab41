"""Multi-head attention with grouped-query heads, QK-norm, RoPE and post-norm."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from starflow_jax.layers.linear import dense
from starflow_jax.layers.norms import RMSNorm, make_norm
from starflow_jax.layers.rope import apply_rope


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float,
                          causal: bool, mask: jax.Array | None = None) -> jax.Array:
    """Softmax attention over ``(b, seq, heads, head_dim)`` arrays; ``k``/``v`` may have
    fewer heads than ``q`` (grouped-query: query head ``i`` reads kv head
    ``i // (heads / kv_heads)``). ``mask`` is boolean, ``True`` where a query may attend."""
    if mask is not None:
        mask = jnp.broadcast_to(mask, (q.shape[0], q.shape[2], q.shape[1], k.shape[1])) if mask.ndim == 2 else mask
        if causal:
            lq, lk = q.shape[1], k.shape[1]
            mask = mask & jnp.tril(jnp.ones((lq, lk), bool), lk - lq)
            causal = False
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=causal)


class Attention(nnx.Module):
    def __init__(self, channels: int, head_dim: int, num_heads: int, num_kv_heads: int, *,
                 norm_type: str, use_qk_norm: bool, use_post_norm: bool, use_bias: bool,
                 hf_style_rope: bool, causal: bool, dtype, param_dtype, rngs: nnx.Rngs):
        self.head_dim = head_dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.hf_style_rope = hf_style_rope
        self.causal = causal
        q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
        self.norm = make_norm(norm_type, channels, param_dtype)
        self.qkv = dense(channels, q_size + 2 * kv_size, use_bias=use_bias, dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs)
        self.proj = dense(q_size, channels, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.query_norm = RMSNorm(head_dim, param_dtype=param_dtype) if use_qk_norm else None
        self.key_norm = RMSNorm(head_dim, param_dtype=param_dtype) if use_qk_norm else None
        self.post_norm = RMSNorm(channels, param_dtype=param_dtype) if use_post_norm else None

    def qkv_heads(self, x: jax.Array, rope: tuple[jax.Array, jax.Array] | None):
        """Project ``(b, seq, c)`` to rotated, normalised ``q, k, v`` heads."""
        b, t, _ = x.shape
        h = self.norm(x) if self.norm is not None else x
        qkv = self.qkv(h)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q = qkv[..., :q_size].reshape(b, t, self.num_heads, self.head_dim)
        k = qkv[..., q_size:q_size + kv_size].reshape(b, t, self.num_kv_heads, self.head_dim)
        v = qkv[..., q_size + kv_size:].reshape(b, t, self.num_kv_heads, self.head_dim)
        if self.query_norm is not None:
            q, k = self.query_norm(q), self.key_norm(k)
        if rope is not None:
            cos, sin = rope
            q = apply_rope(q, cos, sin, self.hf_style_rope)
            k = apply_rope(k, cos, sin, self.hf_style_rope)
        return q, k, v

    def output(self, o: jax.Array) -> jax.Array:
        b, t = o.shape[:2]
        out = self.proj(o.reshape(b, t, self.num_heads * self.head_dim))
        return self.post_norm(out) if self.post_norm is not None else out

    def cached(self, x: jax.Array, rope, cache_k: jax.Array, cache_v: jax.Array, start: jax.Array,
               temp: float = 1.0):
        """Causal attention of ``m`` new slots starting at slot ``start`` over a KV cache
        ``(b, slots, kv_heads, head_dim)``: the new keys/values (rotated) are written at
        ``start..start+m-1`` and every new slot attends to the slots up to itself.
        ``rope`` holds the tables of the new slots. Returns ``(out, cache_k, cache_v)``."""
        q, k, v = self.qkv_heads(x, rope)
        cache_k = jax.lax.dynamic_update_slice_in_dim(cache_k, k.astype(cache_k.dtype), start, axis=1)
        cache_v = jax.lax.dynamic_update_slice_in_dim(cache_v, v.astype(cache_v.dtype), start, axis=1)
        m, slots = x.shape[1], cache_k.shape[1]
        mask = jnp.arange(slots)[None, :] <= (start + jnp.arange(m))[:, None]
        o = jax.nn.dot_product_attention(q, cache_k.astype(q.dtype), cache_v.astype(q.dtype),
                                         mask=mask[None, None], scale=self.head_dim ** -0.5 / temp)
        return self.output(o), cache_k, cache_v

    def __call__(self, x: jax.Array, rope=None, mask: jax.Array | None = None, temp: float = 1.0) -> jax.Array:
        q, k, v = self.qkv_heads(x, rope)
        o = dot_product_attention(q, k, v, scale=self.head_dim ** -0.5 / temp, causal=self.causal, mask=mask)
        return self.output(o)
