"""The training step's dense matmuls alone, as one compiled forward and backward pass: a
floor for the step time on a backend (``bench train --matmul-floor``).

Every flow block's layers keep their shapes (rows = batch x sequence, the qkv, attention
output and MLP projections, stacked and scanned as in the model), but attention, norms,
activations, the flow's affine step and the optimiser are left out: what remains is the
work that a matmul library does at (at best) its peak. If even this chain runs below a
target's FLOP rate, no work on the rest of the step reaches it."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from starflow_jax.bench.flops import block_layouts, layer_flops
from starflow_jax.config.model_config import ModelConfig


def chain_shapes(cfg: ModelConfig, x_shape: tuple[int, ...]) -> list[dict]:
    """Per flow block with layers: ``rows`` (batch x sequence), ``channels``, ``qkv``
    (query + key + value width), ``attn`` (heads x head_dim), ``hidden``, ``mlp_in``
    (1, or 2 for SwiGLU's gate and up projections), ``layers``, ``block`` (its index), and
    ``heads``, ``kv_heads``, ``head_dim`` (for ``row_flops``)."""
    return [
        dict(
            rows=x_shape[0] * lay["seqs"] * (lay["tokens"] + lay["txt"]),
            channels=lay["channels"],
            qkv=(lay["heads"] + 2 * lay["kv_heads"]) * cfg.head_dim,
            attn=lay["heads"] * cfg.head_dim,
            hidden=int(lay["channels"] * cfg.expansion),
            mlp_in=2 if cfg.use_swiglu else 1,
            layers=lay["layers"],
            block=lay["block"],
            heads=lay["heads"],
            kv_heads=lay["kv_heads"],
            head_dim=cfg.head_dim,
        )
        for lay in block_layouts(cfg, x_shape)
    ]


def row_flops(s: dict) -> float:
    """Forward FLOPs of one row (token) through one layer's four projections (``layer_flops``
    of one slot, no attention)."""
    return layer_flops(1, s["channels"], s["heads"], s["kv_heads"], s["head_dim"], s["hidden"], s["mlp_in"] == 2, 0)


def chain_flops(shapes: list[dict]) -> float:
    """Forward and backward FLOPs of the chain (3x the forward's matmuls)."""
    return 3 * sum(s["rows"] * row_flops(s) * s["layers"] for s in shapes)


def sampling_dense_flops(
    cfg: ModelConfig, x_shape: tuple[int, ...], passes: list[int], tokens_per_pass: int, guidance: float
) -> float:
    """The dense projections' FLOPs of one sampling run (attention not counted: a lower
    bound on its work): ``passes`` per block in sampling order (the deep block first, as
    ``sample(return_passes=True)`` gives them), each pass ``tokens_per_pass`` tokens of
    every batch row through every layer; guidance doubles the rows of the guided blocks
    (the deep block, and all with ``cond_top_only=False``)."""
    by_block = {s["block"]: s for s in chain_shapes(cfg, x_shape)}
    n = cfg.num_blocks
    total = 0.0
    for k, p in enumerate(passes):
        block = n - 1 - k
        if block not in by_block:
            continue
        guided = guidance > 0 and (block == n - 1 or not cfg.cond_top_only)
        rows = x_shape[0] * (2 if guided else 1) * tokens_per_pass
        total += p * rows * by_block[block]["layers"] * row_flops(by_block[block])
    return total


def init_chain(shapes: list[dict], dtype, seed: int = 0):
    """Inputs and stacked weights of the chain (scaled so that activations stay O(1))."""
    key = jax.random.key(seed)
    params = []
    for s in shapes:
        key, kx, *kw = jax.random.split(key, 6)
        n, c = s["layers"], s["channels"]

        def w(k, fan_in, fan_out):
            return (jax.random.normal(k, (n, fan_in, fan_out), jnp.float32) / fan_in**0.5 / 4).astype(dtype)

        params.append(
            dict(
                x=jax.random.normal(kx, (s["rows"], c), jnp.float32).astype(dtype),
                qkv=w(kw[0], c, s["qkv"]),
                out=w(kw[1], s["attn"], c),
                mlp_in=w(kw[2], c, s["mlp_in"] * s["hidden"]),
                mlp_out=w(kw[3], s["hidden"], c),
            )
        )
    return params


def chain_loss(params) -> jax.Array:
    """Sum of squares of every block's output; per layer ``x += mix(x Wqkv) Wo`` then
    ``x += gate(x Win) Wout``, where ``mix`` adds the key / value columns' row sum to the
    query columns and ``gate`` multiplies SwiGLU's two halves: cheap elementwise stand-ins
    for attention and the activation that use every column (so XLA cannot shrink a
    matmul by slicing its weights), giving the backward pass the model's matmuls."""
    total = jnp.zeros((), jnp.float32)
    for p in params:
        attn, hidden = p["out"].shape[1], p["mlp_out"].shape[1]

        def layer(x, w, attn=attn, hidden=hidden):
            y = x @ w["qkv"]
            x = x + (y[:, :attn] + jnp.sum(y[:, attn:], axis=-1, keepdims=True)) @ w["out"]
            y = x @ w["mlp_in"]
            m = y if y.shape[-1] == hidden else y[:, :hidden] * y[:, hidden:]
            return x + m @ w["mlp_out"], None

        x, _ = jax.lax.scan(layer, p["x"], {k: p[k] for k in ("qkv", "out", "mlp_in", "mlp_out")})
        total = total + jnp.sum(jnp.square(x.astype(jnp.float32)))
    return total


def chain_step():
    """The jitted forward and backward pass of the chain (gradients for inputs and weights)."""
    return jax.jit(jax.grad(chain_loss))
