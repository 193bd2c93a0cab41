"""Pure flow math: the affine step, its log-determinant, reading orders, the loss."""

from starflow_jax.flow.affine import (
    INV_SOFTPLUS_1,
    affine_forward,
    affine_inverse,
    scale_from_raw,
    shift_right,
    soft_clip,
    split_raw,
)
from starflow_jax.flow.loss import bits_per_dim, nll_loss, nll_per_example
from starflow_jax.flow.permutation import FLIP, IDENTITY, block_orders, flatten_tokens, permute

__all__ = [
    "INV_SOFTPLUS_1",
    "affine_forward",
    "affine_inverse",
    "scale_from_raw",
    "shift_right",
    "soft_clip",
    "split_raw",
    "bits_per_dim",
    "nll_loss",
    "nll_per_example",
    "FLIP",
    "IDENTITY",
    "block_orders",
    "flatten_tokens",
    "permute",
]
