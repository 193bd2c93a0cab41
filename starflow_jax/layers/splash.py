"""Attention through the Pallas TPU splash-attention kernel (``jax.experimental.pallas``).

The kernel takes per-example ``(heads, seq, head_dim)`` arrays with sequence lengths in
multiples of its blocks, an unscaled query and a mask known when the program is traced:
the causal mask (computed in the kernel, nothing stored), or any boolean ``(q, k)`` NumPy
mask or ``IndexMask`` rule (the denoiser's block-causal mask), from which the
kernel's block-sparsity tables are built once, so fully-masked blocks are skipped.

Sequences are padded to a multiple of 128 (padded keys are masked, padded queries read
key 0 and are dropped); grouped-query heads are repeated to the query heads. On a TPU the
kernel is compiled by Mosaic; elsewhere it runs in Pallas' interpreter (tests, CPU), same
numbers, slowly."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from starflow_jax.layers.masks import IndexMask
from starflow_jax.layers.platform import target_platform
from starflow_jax.parallel.rules import BATCH_AXES

PAD = 128
MAX_NUMPY_MASK = 1 << 26  # entries of a materialised (q, k) mask (64 Mi booleans)


def _block(n: int) -> int:
    return next(b for b in (512, 256, 128) if n % b == 0)


def _pad_to(n: int) -> int:
    return -(-n // PAD) * PAD


def static_mask(mask):
    """A mask known at trace time: an ``IndexMask`` rule or a NumPy array (splash builds its
    block tables from it)."""
    if mask is None or isinstance(mask, (np.ndarray, IndexMask)):
        return mask
    if isinstance(mask, jax.core.Tracer):
        raise ValueError(
            "splash attention needs a mask known when the program is traced (a NumPy array or an "
            "IndexMask), got a traced value: build the mask outside jit/scan"
        )
    return np.asarray(mask)


def _rule(lq: int, lk: int, causal: bool, rule):
    """The padded ``(Lq, Lk)`` mask as an index rule: ``rule`` (or everything) on the real
    slots, causal if asked (bottom-right aligned), padded keys hidden, padded queries read
    key 0 (their outputs are dropped)."""

    def fn(q, k):
        ok = k < lk
        if rule is not None:
            ok = ok & rule(q, k)
        if causal:
            ok = ok & (k <= q + (lk - lq))
        return (ok & (q < lq)) | ((q >= lq) & (k == 0))

    return fn


def _kernel(lq: int, lk: int, heads: int, mask_obj, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    bq, bk = _block(lq), _block(lk)
    sizes = sk.BlockSizes(
        block_q=bq,
        block_kv=bk,
        block_kv_compute=bk,
        block_q_dkv=bq,
        block_kv_dkv=bk,
        block_kv_dkv_compute=bk,
        block_q_dq=bq,
        block_kv_dq=bk,
    )
    return sk.make_splash_mha(
        sm.MultiHeadMask([mask_obj] * heads), head_shards=1, q_seq_shards=1, block_sizes=sizes, interpret=interpret
    )


def _rule_mask_class():
    """Splash's computable mask for an arbitrary index rule (identity-hashed: the kernel
    factory may cache on the mask)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    class RuleMask(sm._ComputableMask):
        def __eq__(self, other):
            return self is other

        def __hash__(self):
            return id(self)

    return RuleMask


def _mask_object(lq: int, lk: int, Lq: int, Lk: int, causal: bool, mask):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    if mask is None and causal and lq == lk:
        return sm.CausalMask((Lq, Lk))  # padded keys come after every real query: hidden by causality
    if mask is None or isinstance(mask, IndexMask):
        rule = None if mask is None else mask.fn
        return _rule_mask_class()((Lq, Lk), _rule(lq, lk, causal, rule))
    if Lq * Lk > MAX_NUMPY_MASK:
        raise ValueError(
            f"a ({Lq}, {Lk}) NumPy attention mask is too large for splash attention: give it as "
            "layers.attention.IndexMask (an index rule), or use attention_impl='blocked'"
        )
    full = np.asarray(_rule(lq, lk, causal, None)(np.arange(Lq)[:, None], np.arange(Lk)[None, :]))
    full[:lq, :lk] &= np.broadcast_to(mask.astype(bool), (lq, lk))
    return sm.NumpyMask(full)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float, causal: bool, mask=None) -> jax.Array:
    """Same arguments and result as ``attention.dot_product_attention`` (``(b, seq, heads,
    head_dim)``; ``mask`` a 2D ``(q_len, k_len)`` boolean array known at trace time)."""
    b, lq, heads, d = q.shape
    lk, kv = k.shape[1], k.shape[2]
    mask = static_mask(mask)
    if mask is not None:
        if tuple(mask.shape[-2:]) != (lq, lk) or (isinstance(mask, np.ndarray) and mask.size != lq * lk):
            raise ValueError(
                f"splash attention takes one ({lq}, {lk}) mask for all examples and heads, got shape "
                f"{tuple(mask.shape)}"
            )
        if isinstance(mask, np.ndarray):
            mask = mask.reshape(lq, lk)
    Lq, Lk = _pad_to(lq), _pad_to(lk)
    mask_obj = _mask_object(lq, lk, Lq, Lk, causal, mask)
    interpret = target_platform() != "tpu"
    if kv != heads:
        k = jnp.repeat(k, heads // kv, axis=2)
        v = jnp.repeat(v, heads // kv, axis=2)
    spec, local_heads = _shard_spec(b, heads)
    kernel = _kernel(Lq, Lk, local_heads, mask_obj, interpret)

    def heads_major(a, n):
        a = a.transpose(0, 2, 1, 3)
        return jnp.pad(a, ((0, 0), (0, 0), (0, n - a.shape[2]), (0, 0))) if n != a.shape[2] else a

    def local(q, k, v):
        out = jax.vmap(kernel)(heads_major(q * jnp.asarray(scale, q.dtype), Lq), heads_major(k, Lk), heads_major(v, Lk))
        return out[:, :, :lq].transpose(0, 2, 1, 3).astype(q.dtype)

    if spec is None:
        return local(q, k, v)
    # a Mosaic kernel is not partitioned automatically: each device runs it on its shard
    return jax.shard_map(local, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(q, k, v)


def _shard_spec(batch: int, heads: int):
    """Under a mesh (``jax.set_mesh``): the ``(b, seq, heads, d)`` sharding each device's
    kernel call sees (batch over ``(data, fsdp)``, heads over ``tensor``, when they divide)
    and the heads per device; ``(None, heads)`` without a mesh."""
    from jax.sharding import PartitionSpec as P

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None, heads
    names = mesh.axis_names
    b_axes = tuple(a for a in BATCH_AXES if a in names and mesh.shape[a] > 1)
    b_size = int(np.prod([mesh.shape[a] for a in b_axes])) if b_axes else 1
    use_b = b_axes if b_axes and batch % b_size == 0 else None
    t = mesh.shape["tensor"] if "tensor" in names else 1
    use_t = "tensor" if t > 1 and heads % t == 0 else None
    return P(use_b, None, use_t, None), heads // (t if use_t else 1)
