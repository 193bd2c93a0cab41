"""The feed-forward sub-layer: GELU MLP or SwiGLU (gated, tanh-GELU)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from starflow_jax.layers.linear import apply_split_dense, dense, split_dense
from starflow_jax.layers.norms import RMSNorm, make_norm


def gelu_exact(x: jax.Array) -> jax.Array:
    """``x * (1 + erf(x / sqrt 2)) / 2``: torch's exact GELU, written with ``erf`` as torch
    does (``jax.nn.gelu(approximate=False)`` goes through ``erfc``, whose XLA:CPU expansion
    made the deep block's forward and backward pass at ``configs/bench_s.py`` 5 % slower;
    same values within float32 rounding)."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(np.sqrt(0.5), x.dtype)))


class MLP(nnx.Module):
    def __init__(
        self,
        channels: int,
        expansion: float,
        *,
        use_swiglu: bool,
        norm_type: str,
        use_post_norm: bool,
        use_bias: bool,
        dtype,
        param_dtype,
        rngs: nnx.Rngs,
    ):
        hidden = int(channels * expansion)
        self.use_swiglu = use_swiglu
        self.norm = make_norm(norm_type, channels, param_dtype)
        self.post_norm = RMSNorm(channels, param_dtype=param_dtype) if use_post_norm else None
        kw = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        # input projections column-parallel (the hidden width over ``tensor``), the output one row-parallel
        up = dict(kw, kernel_axes=("embed", "mlp"), bias_axes=("mlp",))
        down = dict(kw, kernel_axes=("mlp", "embed"), bias_axes=("features",))
        if use_swiglu:
            self.gate_proj = dense(channels, hidden, **up)
            self.up_proj = dense(channels, hidden, **up)
            self.down_proj = dense(hidden, channels, **down)
        else:
            self.fc1 = dense(channels, hidden, **up)
            self.fc2 = dense(hidden, channels, **down)

    def split(self, parts: int) -> dict:
        """The weights cut for ``__call__(split=...)`` (decoding): input projections by
        output columns, the output projection by input rows, so each piece of the hidden
        layer goes from its input matmul to its output matmul on its own."""
        names = ("gate_proj", "up_proj") if self.use_swiglu else ("fc1",)
        out = {n: split_dense(getattr(self, n), parts, "out") for n in names}
        last = "down_proj" if self.use_swiglu else "fc2"
        out[last] = split_dense(getattr(self, last), parts, "in")
        return out

    def __call__(self, x: jax.Array, split: dict | None = None) -> jax.Array:
        h = self.norm(x) if self.norm is not None else x
        if split is not None:
            if self.use_swiglu:
                gates = apply_split_dense(h, split["gate_proj"])
                ups = apply_split_dense(h, split["up_proj"])
                h = apply_split_dense(
                    tuple(jax.nn.gelu(g, approximate=True) * u for g, u in zip(gates, ups)), split["down_proj"]
                )
            else:
                h = apply_split_dense(tuple(gelu_exact(a) for a in apply_split_dense(h, split["fc1"])), split["fc2"])
            return self.post_norm(h) if self.post_norm is not None else h
        if self.use_swiglu:
            gate = checkpoint_name(self.gate_proj(h), "mlp_in_proj")
            up = checkpoint_name(self.up_proj(h), "mlp_in_proj")
            h = checkpoint_name(self.down_proj(jax.nn.gelu(gate, approximate=True) * up), "mlp_out_proj")
        else:
            h = checkpoint_name(self.fc1(h), "mlp_in_proj")
            h = checkpoint_name(self.fc2(gelu_exact(h)), "mlp_out_proj")
        return self.post_norm(h) if self.post_norm is not None else h
