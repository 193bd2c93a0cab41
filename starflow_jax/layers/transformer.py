"""A pre-norm Transformer layer and a stack of them with stacked parameters, applied
with ``nnx.scan`` so that compile time does not grow with depth."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from starflow_jax.layers.attention import Attention
from starflow_jax.layers.linear import split_dense
from starflow_jax.layers.mlp import MLP
from starflow_jax.parallel.rules import constrain_batch

LAYER_AXIS = "layers"

# Rematerialisation of the scanned layers (the activations kept for the backward pass):
# "none" keeps everything, "full" keeps only each layer's input, "dots" also keeps the
# outputs of the matmuls without batch dimensions, "dots_all" of all matmuls (attention
# scores too); "proj" keeps the outputs of the four named projections (``checkpoint_name``
# tags in the attention and MLP: qkv, attention output, MLP in / out) and recomputes the
# rest (norms, RoPE, attention, activations); "offload" keeps the same projections but in
# host memory (``pinned_host``), fetched back for the backward pass: device memory as
# "full", less recomputation (TPU / GPU).
PROJECTIONS = ("qkv_proj", "attn_out_proj", "mlp_in_proj", "mlp_out_proj")
REMAT_POLICIES = {
    "none": None,
    "full": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots_all": jax.checkpoint_policies.checkpoint_dots,
    "proj": jax.checkpoint_policies.save_only_these_names(*PROJECTIONS),
    "offload": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[],
        names_which_can_be_offloaded=list(PROJECTIONS),
        offload_src="device",
        offload_dst="pinned_host",
    ),
}


def resolve_remat(remat: bool | str) -> str:
    """``True``/``False`` (older configs) or a policy name of ``REMAT_POLICIES``."""
    if isinstance(remat, bool):
        return "full" if remat else "none"
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat policy {remat!r} unknown; choose one of {sorted(REMAT_POLICIES)} (or true/false)")
    return remat


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
    attention_impl: str = "xla"
    attention_block: int = 512


class TransformerLayer(nnx.Module):
    """``x + attention(x)`` then ``x + mlp(x)`` (norms inside the sub-layers)."""

    def __init__(self, spec: LayerSpec, *, rngs: nnx.Rngs):
        dtype, param_dtype = jnp.dtype(spec.dtype), jnp.dtype(spec.param_dtype)
        self.attention = Attention(
            spec.channels,
            spec.head_dim,
            spec.num_heads,
            spec.num_kv_heads,
            norm_type=spec.norm_type,
            use_qk_norm=spec.use_qk_norm,
            use_post_norm=spec.use_post_norm,
            use_bias=spec.use_bias,
            hf_style_rope=spec.hf_style_rope,
            causal=spec.causal,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
            attention_impl=spec.attention_impl,
            attention_block=spec.attention_block,
        )
        self.mlp = MLP(
            spec.channels,
            spec.expansion,
            use_swiglu=spec.use_swiglu,
            norm_type=spec.norm_type,
            use_post_norm=spec.use_post_norm,
            use_bias=spec.use_bias,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def __call__(self, x, rope=None, mask=None, temp: float = 1.0):
        x = constrain_batch(x)
        x = x + self.attention(x, rope, mask, temp)
        return constrain_batch(x + self.mlp(x))

    def cached(self, x, rope, cache, first_slots, start, write: int = 0, temp: float = 1.0, split: dict | None = None):
        """One layer over new slots with a chunked KV cache (``Attention.cached``);
        ``split``: its weights cut by ``split_weights`` (each matmul as independent pieces)."""
        split = split or {}
        a, cache = self.attention.cached(x, rope, cache, first_slots, start, write, temp, split.get("attention"))
        x = x + a
        return x + self.mlp(x, split.get("mlp")), cache

    def split_weights(self, parts: int) -> dict:
        """Every projection's weights cut into ``parts`` pieces (``linear.split_dense``): the
        qkv and attention-output projections by output columns, the MLP as ``MLP.split``."""
        attn = self.attention
        return dict(
            attention=dict(qkv=split_dense(attn.qkv, parts, "out"), proj=split_dense(attn.proj, parts, "out")),
            mlp=self.mlp.split(parts),
        )


def create_stack(spec: LayerSpec, num_layers: int, rngs: nnx.Rngs) -> TransformerLayer:
    """``num_layers`` layers whose parameters are stacked along a leading axis."""

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: LAYER_AXIS})
    def create(rngs):
        return TransformerLayer(spec, rngs=rngs)

    return create(rngs)


def apply_stack(
    stack: TransformerLayer, x: jax.Array, rope=None, mask=None, temp: float = 1.0, remat: bool | str = False
) -> jax.Array:
    """Run the stacked layers over ``x`` with ``nnx.scan``, rematerialised per layer by the
    policy ``remat`` (see ``REMAT_POLICIES``)."""

    # the mask is closed over, not scanned: a NumPy mask stays static inside the body
    # (the splash kernel builds its block tables from it at trace time)
    def body(h, layer, rope):
        return layer(h, rope, mask, temp)

    policy = resolve_remat(remat)
    if policy != "none":
        body = nnx.remat(body, policy=REMAT_POLICIES[policy])
    scan = nnx.scan(body, in_axes=(nnx.Carry, 0, None), out_axes=nnx.Carry)
    return scan(x, stack, rope)


def apply_stack_cached(
    stack: TransformerLayer,
    x: jax.Array,
    rope,
    cache_k: jax.Array,
    cache_v: jax.Array,
    start: jax.Array,
    temp: float = 1.0,
):
    """Run the stacked layers over new slots ``start..start+m-1`` with stacked KV caches
    ``(layers, b, kv_heads, slots, head_dim)``; returns ``(x, cache_k, cache_v)``.

    The caches travel in the scan carry and only the new rows are written back (in
    place). On backends whose matmuls cannot read a dynamic slice of a stacked array in
    place (the CPU), each layer step copies its weights and cache slice; there
    ``unstack_layers`` + ``apply_layers_cached`` avoid the copies."""

    def body(carry, layer, rope, start):
        h, ck, cv, i = carry
        h, ((k_new, v_new),) = layer.cached(h, rope, [(ck[i], cv[i])], (0,), start, 0, temp)
        m = h.shape[1]
        k_rows = jax.lax.dynamic_slice_in_dim(k_new, start, m, axis=2)
        v_rows = jax.lax.dynamic_slice_in_dim(v_new, start, m, axis=2)
        zero = jnp.zeros((), jnp.int32)
        ck = jax.lax.dynamic_update_slice(ck, k_rows[None], (i, zero, zero, start, zero))
        cv = jax.lax.dynamic_update_slice(cv, v_rows[None], (i, zero, zero, start, zero))
        return h, ck, cv, i + 1

    scan = nnx.scan(body, in_axes=(nnx.Carry, 0, None, None), out_axes=nnx.Carry)
    x, cache_k, cache_v, _ = scan((x, cache_k, cache_v, jnp.int32(0)), stack, rope, start)
    return x, cache_k, cache_v


def unstack_layers(stack: TransformerLayer, num_layers: int) -> list[TransformerLayer]:
    """The stacked layers as ``num_layers`` separate layers (static slices of the stacked
    parameters: no copy per use inside a loop)."""
    graphdef, state = nnx.split(stack)
    return [nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state)) for i in range(num_layers)]


def apply_layers_cached(
    layers: list[TransformerLayer],
    x: jax.Array,
    rope,
    caches,
    first_slots,
    start: jax.Array,
    write: int = 0,
    temp: float = 1.0,
    splits: list[dict] | None = None,
):
    """``apply_stack_cached`` over separate layers (unrolled; program size grows with the
    depth), each with its KV cache in chunks ``[(k, v), ...]`` (``Attention.cached``;
    ``first_slots`` the first slot of each chunk, ``write`` the chunk holding the new
    slots), updated in place; ``splits``: each layer's weights cut by
    ``TransformerLayer.split_weights``. Returns ``(x, caches)``."""
    out = []
    for i, (layer, cache) in enumerate(zip(layers, caches)):
        x, cache = layer.cached(x, rope, cache, first_slots, start, write, temp, None if splits is None else splits[i])
        out.append(cache)
    return x, out
