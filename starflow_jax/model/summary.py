"""Parameter counts of a configuration, computed abstractly (nothing is allocated)."""

from __future__ import annotations

import math

import jax
from flax import nnx

from starflow_jax.config.model_config import ModelConfig
from starflow_jax.flow.permutation import block_orders
from starflow_jax.model.starflow import StarFlow


def abstract_model(cfg: ModelConfig) -> StarFlow:
    """The model with ``jax.ShapeDtypeStruct`` leaves in place of arrays."""
    return nnx.eval_shape(lambda: StarFlow(cfg, rngs=nnx.Rngs(0)))


def count(module) -> int:
    if module is None:
        return 0
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(nnx.state(module, nnx.Param)))


def parameter_counts(cfg: ModelConfig) -> dict:
    """Total, per block (bottom to top) and denoiser parameter counts, with a row per block."""
    model = abstract_model(cfg)
    orders = block_orders(cfg.num_blocks, cfg.seq_order)
    rows = []
    for i, block in enumerate(model.blocks):
        top = i == cfg.num_blocks - 1
        layers = cfg.layers_per_block[i]
        rows.append(
            dict(
                block=i,
                role="deep" if top else "shallow",
                layers=layers,
                channels=(cfg.top_channels if top else cfg.channels) if layers else 0,
                order=orders[i] if layers else "-",
                conditioned=bool(cfg.txt_dim > 0 and layers and (top or not cfg.cond_top_only)),
                params=count(block),
            )
        )
    denoiser = count(model.learnable_self_denoiser)
    return dict(total=count(model), blocks=rows, denoiser=denoiser, flow=sum(r["params"] for r in rows))
