"""A pre-norm Transformer layer and a stack of them with stacked parameters, applied
with ``nnx.scan`` so that compile time does not grow with depth."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from starflow_jax.layers.attention import Attention
from starflow_jax.layers.mlp import MLP

LAYER_AXIS = "layers"


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    channels: int
    head_dim: int
    num_heads: int
    num_kv_heads: int
    expansion: float
    norm_type: str
    use_swiglu: bool
    use_qk_norm: bool
    use_post_norm: bool
    use_bias: bool
    hf_style_rope: bool
    causal: bool
    dtype: str
    param_dtype: str


class TransformerLayer(nnx.Module):
    """``x + attention(x)`` then ``x + mlp(x)`` (norms inside the sub-layers)."""

    def __init__(self, spec: LayerSpec, *, rngs: nnx.Rngs):
        dtype, param_dtype = jnp.dtype(spec.dtype), jnp.dtype(spec.param_dtype)
        self.attention = Attention(
            spec.channels, spec.head_dim, spec.num_heads, spec.num_kv_heads, norm_type=spec.norm_type,
            use_qk_norm=spec.use_qk_norm, use_post_norm=spec.use_post_norm, use_bias=spec.use_bias,
            hf_style_rope=spec.hf_style_rope, causal=spec.causal, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mlp = MLP(spec.channels, spec.expansion, use_swiglu=spec.use_swiglu, norm_type=spec.norm_type,
                       use_post_norm=spec.use_post_norm, use_bias=spec.use_bias, dtype=dtype,
                       param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, rope=None, mask=None, temp: float = 1.0):
        x = x + self.attention(x, rope, mask, temp)
        return x + self.mlp(x)


    def cached(self, x, rope, cache_k, cache_v, start, temp: float = 1.0):
        a, cache_k, cache_v = self.attention.cached(x, rope, cache_k, cache_v, start, temp)
        x = x + a
        return x + self.mlp(x), cache_k, cache_v


def create_stack(spec: LayerSpec, num_layers: int, rngs: nnx.Rngs) -> TransformerLayer:
    """``num_layers`` layers whose parameters are stacked along a leading axis."""

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: LAYER_AXIS})
    def create(rngs):
        return TransformerLayer(spec, rngs=rngs)

    return create(rngs)


def apply_stack(stack: TransformerLayer, x: jax.Array, rope=None, mask=None, temp: float = 1.0,
                remat: bool = False) -> jax.Array:
    """Run the stacked layers over ``x`` with ``nnx.scan`` (optionally rematerialised)."""

    def body(h, layer, rope, mask):
        return layer(h, rope, mask, temp)

    if remat:
        body = nnx.remat(body)
    scan = nnx.scan(body, in_axes=(nnx.Carry, 0, None, None), out_axes=nnx.Carry)
    return scan(x, stack, rope, mask)


def apply_stack_cached(stack: TransformerLayer, x: jax.Array, rope, cache_k: jax.Array, cache_v: jax.Array,
                       start: jax.Array, temp: float = 1.0):
    """Run the stacked layers over new slots ``start..start+m-1`` with per-layer KV caches
    ``(layers, b, slots, kv_heads, head_dim)``; returns ``(x, cache_k, cache_v)``.

    The caches travel in the scan carry and only the new rows are written (in place), so
    a step costs the attention read of each layer's cache, not a copy of the caches."""

    def body(carry, layer, rope, start):
        h, ck, cv, i = carry
        h, k_new, v_new = layer.cached(h, rope, ck[i], cv[i], start, temp)
        m = h.shape[1]
        k_rows = jax.lax.dynamic_slice_in_dim(k_new, start, m, axis=1)
        v_rows = jax.lax.dynamic_slice_in_dim(v_new, start, m, axis=1)
        zero = jnp.zeros((), jnp.int32)
        ck = jax.lax.dynamic_update_slice(ck, k_rows[None], (i, zero, start, zero, zero))
        cv = jax.lax.dynamic_update_slice(cv, v_rows[None], (i, zero, start, zero, zero))
        return h, ck, cv, i + 1

    scan = nnx.scan(body, in_axes=(nnx.Carry, 0, None, None), out_axes=nnx.Carry)
    x, cache_k, cache_v, _ = scan((x, cache_k, cache_v, jnp.int32(0)), stack, rope, start)
    return x, cache_k, cache_v
