"""Dense layers initialised like ``torch.nn.Linear`` (uniform, bound 1/sqrt(fan_in))."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from starflow_jax.parallel.rules import logical_axes

TORCH_KERNEL_INIT = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

# the logical axes of a projection into or out of the transformer (patches, text features):
# split FSDP-style on its input side only
PROJECTION_AXES = dict(kernel_axes=("embed", "features"), bias_axes=("features",))


def dense(
    in_features: int,
    out_features: int,
    *,
    kernel_axes: tuple[str, str] | None = None,
    bias_axes: tuple[str] | None = None,
    use_bias: bool = True,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    zero_init: bool = False,
    rngs: nnx.Rngs,
) -> nnx.Linear:
    """A Linear layer; its ``kernel`` is ``(in, out)`` (the transpose of torch's ``weight``),
    with the logical axes ``kernel_axes`` / ``bias_axes`` (``parallel.rules.LOGICAL_RULES``;
    every layer of the flow model declares them: ``parallel.rules.tree_shardings`` refuses
    a parameter without; the autoencoders, never sharded, leave them out)."""
    bound = 1.0 / float(in_features) ** 0.5

    def bias_init(key, shape, dtype=param_dtype):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return nnx.Linear(
        in_features,
        out_features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nnx.initializers.zeros if zero_init else TORCH_KERNEL_INIT,
        bias_init=bias_init,
        precision=None,
        kernel_metadata=logical_axes(*kernel_axes) if kernel_axes else {},
        bias_metadata=logical_axes(*bias_axes) if bias_axes else {},
        rngs=rngs,
    )


def split_dense(linear: nnx.Linear, parts: int, axis: str) -> tuple:
    """A Linear's weights cut into ``parts`` near-equal pieces along its output columns
    (``axis="out"``) or input rows (``"in"``), for ``apply_split_dense``: ``(axis,
    kernels, biases, dtype)``. Cut once, outside a decoding loop."""
    kernel = linear.kernel[...]
    bias = None if linear.bias is None else linear.bias[...]
    n = kernel.shape[1] if axis == "out" else kernel.shape[0]
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    cuts = list(zip(bounds[:-1], bounds[1:]))
    dtype = jnp.dtype(linear.dtype or kernel.dtype)
    if axis == "out":
        biases = None if bias is None else tuple(bias[a:b] for a, b in cuts)
        return axis, tuple(kernel[:, a:b] for a, b in cuts), biases, dtype
    if axis == "in":
        return axis, tuple(kernel[a:b] for a, b in cuts), bias, dtype
    raise ValueError(f"axis must be 'out' or 'in', got {axis!r}")


def apply_split_dense(x, weights):
    """``x @ kernel + bias`` as independent matmuls over the pieces of ``split_dense``:
    ``"out"`` returns the pieces' outputs (a tuple, concatenate for the whole), ``"in"``
    takes ``x`` as a tuple of pieces of the input and sums. XLA:CPU runs a small-row
    matmul on one thread but independent matmuls concurrently: decoding one token at a
    time, two pieces use both cores (``docs/performance.md``)."""
    axis, kernels, biases, dtype = weights
    if axis == "out":
        outs = [jnp.dot(x.astype(dtype), k.astype(dtype)) for k in kernels]
        return tuple(outs if biases is None else [o + b.astype(dtype) for o, b in zip(outs, biases)])
    out = sum(jnp.dot(xi.astype(dtype), k.astype(dtype)) for xi, k in zip(x, kernels))
    return out if biases is None else out + biases.astype(dtype)
