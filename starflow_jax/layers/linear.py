"""Dense layers initialised like ``torch.nn.Linear`` (uniform, bound 1/sqrt(fan_in))."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

TORCH_KERNEL_INIT = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def dense(in_features: int, out_features: int, *, use_bias: bool = True, dtype=jnp.float32,
          param_dtype=jnp.float32, zero_init: bool = False, rngs: nnx.Rngs) -> nnx.Linear:
    """A Linear layer; its ``kernel`` is ``(in, out)`` (the transpose of torch's ``weight``)."""
    bound = 1.0 / float(in_features) ** 0.5

    def bias_init(key, shape, dtype=param_dtype):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return nnx.Linear(
        in_features, out_features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
        kernel_init=nnx.initializers.zeros if zero_init else TORCH_KERNEL_INIT,
        bias_init=bias_init, precision=None, rngs=rngs)
