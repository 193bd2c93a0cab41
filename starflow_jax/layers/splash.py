"""Attention through the Pallas TPU splash-attention kernel (``jax.experimental.pallas``).

The kernel takes per-example ``(heads, seq, head_dim)`` arrays with sequence lengths in
multiples of its blocks, an unscaled query and a mask known when the program is traced:
the causal mask (computed in the kernel, nothing stored), or any boolean ``(q, k)`` NumPy
mask (the block-causal denoiser mask, a text prefix, a sliding window), from which the
kernel's block-sparsity tables are built once, so fully-masked blocks are skipped.

Sequences are padded to a multiple of 128 (padded keys are masked, padded queries read
key 0 and are dropped); grouped-query heads are repeated to the query heads. On a TPU the
kernel is compiled by Mosaic; elsewhere it runs in Pallas' interpreter (tests, CPU), same
numbers, slowly."""
from __future__ import annotations

import contextlib
import contextvars

import jax
import jax.numpy as jnp
import numpy as np

_TARGET = contextvars.ContextVar("starflow_attention_target", default=None)
PAD = 128
MAX_NUMPY_MASK = 1 << 26  # entries of a materialised (q, k) mask (64 Mi booleans)


@contextlib.contextmanager
def compile_target(platform: str):
    """Trace attention for ``platform`` (``"tpu"``, ``"gpu"``, ``"cpu"``) instead of the
    default backend: ahead-of-time compilation for a TPU slice from a CPU host
    (``starflow-jax plan``) must pick the TPU kernels and compile them, not interpret them."""
    token = _TARGET.set(platform)
    try:
        yield
    finally:
        _TARGET.reset(token)


def target_platform() -> str:
    return _TARGET.get() or jax.default_backend()


def _block(n: int) -> int:
    return next(b for b in (512, 256, 128) if n % b == 0)


def _pad_to(n: int) -> int:
    return -(-n // PAD) * PAD


def static_mask(mask) -> np.ndarray | None:
    """A mask as a NumPy array at trace time (splash builds its tables from it)."""
    if mask is None or isinstance(mask, np.ndarray):
        return mask
    if isinstance(mask, jax.core.Tracer):
        raise ValueError("splash attention needs a mask known when the program is traced (a NumPy array), "
                         "got a traced value: build the mask with NumPy outside jit/scan")
    return np.asarray(mask)


def _kernel(lq: int, lk: int, heads: int, causal_only: bool, mask_bytes: bytes | None, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    if causal_only:
        one = sm.CausalMask((lq, lk))
    else:
        one = sm.NumpyMask(np.frombuffer(mask_bytes, bool).reshape(lq, lk).copy())
    bq, bk = _block(lq), _block(lk)
    sizes = sk.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq, block_kv_dkv=bk,
                          block_kv_dkv_compute=bk, block_q_dq=bq, block_kv_dq=bk)
    return sk.make_splash_mha(sm.MultiHeadMask([one] * heads), head_shards=1, q_seq_shards=1, block_sizes=sizes,
                              interpret=interpret)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float, causal: bool,
                     mask=None) -> jax.Array:
    """Same arguments and result as ``attention.dot_product_attention`` (``(b, seq, heads,
    head_dim)``; ``mask`` a 2D ``(q_len, k_len)`` boolean array known at trace time)."""
    b, lq, heads, d = q.shape
    lk, kv = k.shape[1], k.shape[2]
    mask = static_mask(mask)
    if mask is not None:
        if mask.ndim != 2:
            mask = np.asarray(mask).reshape(mask.shape[-2:]) if mask.size == lq * lk else None
            if mask is None:
                raise ValueError("splash attention takes one (q_len, k_len) mask for all examples and heads")
        mask = np.broadcast_to(mask.astype(bool), (lq, lk))
    Lq, Lk = _pad_to(lq), _pad_to(lk)
    causal_only = mask is None and causal and lq == lk
    mask_bytes = None
    if not causal_only:
        if Lq * Lk > MAX_NUMPY_MASK:
            raise ValueError(f"a ({Lq}, {Lk}) attention mask is too large to materialise for splash attention; "
                             "use attention_impl='blocked' for this sequence length")
        full = np.zeros((Lq, Lk), bool)
        valid = np.ones((lq, lk), bool) if mask is None else mask
        if causal:
            valid = valid & np.tril(np.ones((lq, lk), bool), lk - lq)
        full[:lq, :lk] = valid
        full[lq:, 0] = True  # padded queries read something; their outputs are dropped
        mask_bytes = full.tobytes()
    interpret = target_platform() != "tpu"
    if kv != heads:
        k = jnp.repeat(k, heads // kv, axis=2)
        v = jnp.repeat(v, heads // kv, axis=2)
    spec, local_heads = _shard_spec(b, heads)
    kernel = _kernel(Lq, Lk, local_heads, causal_only, mask_bytes, interpret)

    def heads_major(a, n):
        a = a.transpose(0, 2, 1, 3)
        return jnp.pad(a, ((0, 0), (0, 0), (0, n - a.shape[2]), (0, 0))) if n != a.shape[2] else a

    def local(q, k, v):
        out = jax.vmap(kernel)(heads_major(q * jnp.asarray(scale, q.dtype), Lq), heads_major(k, Lk),
                               heads_major(v, Lk))
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

    from starflow_jax.parallel.rules import BATCH_AXES

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
