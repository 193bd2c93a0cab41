"""The STARFlow / STARFlow-V model: a stack of flow blocks (shallow blocks next to
the data, one deep block next to the prior) and the optional learnable denoiser."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from starflow_jax.config.model_config import ModelConfig
from starflow_jax.flow.loss import nll_loss
from starflow_jax.flow.permutation import block_orders, token_index
from starflow_jax.model.denoiser import Denoiser
from starflow_jax.model.flow_block import FlowBlock, IdentityBlock
from starflow_jax.model.patchify import patchify, unpatchify


class FlowOutput(NamedTuple):
    """``z``: prior-space sample shaped like the input; ``logdets``: one per block, bottom
    to top; ``outputs``: the patchified input, then every block's output."""

    z: jax.Array
    logdets: list
    outputs: list


class StarFlow(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        orders = block_orders(cfg.num_blocks, cfg.seq_order)
        base_heads = cfg.num_heads or cfg.channels // cfg.head_dim
        blocks = []
        for i in range(cfg.num_blocks):
            top = i == cfg.num_blocks - 1
            n_layers = cfg.layers_per_block[i]
            if n_layers == 0:
                blocks.append(IdentityBlock())
                continue
            blocks.append(
                FlowBlock(
                    cfg,
                    channels=cfg.top_channels if top else cfg.channels,
                    num_heads=(cfg.top_num_heads or cfg.top_channels // cfg.head_dim) if top else base_heads,
                    num_layers=n_layers,
                    order=orders[i],
                    conditioned=cfg.txt_dim > 0 and (top or not cfg.cond_top_only),
                    rngs=rngs,
                )
            )
        self.blocks = nnx.List(blocks)
        self.learnable_self_denoiser = Denoiser(cfg, rngs=rngs) if cfg.learnable_self_denoiser else None

    # ----------------------------------------------------------------- checks
    def check_inputs(self, x: jax.Array, y: jax.Array | None) -> None:
        """Raise a ``ValueError`` naming what is wrong with ``x`` or ``y``."""
        cfg = self.cfg
        if x.ndim not in (4, 5):
            raise ValueError(
                f"x must be an image batch (b, c, h, w) or a video batch (b, t, c, h, w); "
                f"got rank {x.ndim}, shape {tuple(x.shape)}"
            )
        if x.shape[-3] != cfg.in_channels:
            raise ValueError(
                f"x has {x.shape[-3]} channels (axis {x.ndim - 3} of shape {tuple(x.shape)}), "
                f"the model expects in_channels={cfg.in_channels}"
            )
        H, W = x.shape[-2:]
        if H % cfg.patch_size or W % cfg.patch_size:
            raise ValueError(f"x spatial size {H}x{W} is not divisible by patch_size={cfg.patch_size}")
        if not cfg.rope and (H != cfg.img_size or W != cfg.img_size):
            raise ValueError(
                f"x spatial size {H}x{W} must equal img_size={cfg.img_size} for a model "
                "with learned position embeddings (rope=False)"
            )
        if x.ndim == 5 and cfg.rope and cfg.txt_size == 0:
            raise ValueError(
                "video input with RoPE needs a model with txt_size > 0 (its 3D positions "
                "reserve 8 frequencies for the time axis)"
            )
        if cfg.txt_dim > 0:
            if y is None:
                raise ValueError(
                    f"the model is conditioned (txt_dim={cfg.txt_dim}); pass y of shape "
                    f"(b, {cfg.txt_size}, {cfg.txt_dim})"
                )
            if y.ndim != 3 or y.shape[1] != cfg.txt_size or y.shape[2] != cfg.txt_dim:
                raise ValueError(
                    f"conditioning y has shape {tuple(y.shape)}, expected (b, txt_size={cfg.txt_size}, "
                    f"txt_dim={cfg.txt_dim})"
                )
            if y.shape[0] != x.shape[0]:
                raise ValueError(f"conditioning y has batch {y.shape[0]} but x has batch {x.shape[0]}")

    # ----------------------------------------------------------------- forward
    def __call__(self, x: jax.Array, y: jax.Array | None = None, *, remat: bool | str = False) -> FlowOutput:
        """Data to prior: the flow's forward pass with one log-determinant per block."""
        self.check_inputs(x, y)
        cfg = self.cfg
        h = patchify(x, cfg.patch_size)
        outputs, logdets = [h], []
        video = h.ndim == 5
        for block in self.blocks[:-1]:
            if cfg.shallow_block_local and video:
                b, t = h.shape[:2]
                h, ld = block(h.reshape(b * t, 1, *h.shape[2:]), y, remat=remat)
                h = h.reshape(b, t, *h.shape[2:])
                ld = ld.reshape(b, t, *ld.shape[1:]) if ld.ndim > 1 else ld.reshape(b, t).sum(1)
            else:
                h, ld = block(h, y, remat=remat)
            logdets.append(ld)
            outputs.append(h)
        h, ld = self.blocks[-1](h, y, remat=remat)
        logdets.append(ld)
        outputs.append(h)
        return FlowOutput(unpatchify(h, cfg.patch_size), logdets, outputs)

    def nll_per_frame(self, out: FlowOutput) -> jax.Array:
        """The per-dimension NLL (nats, no Gaussian constant) of every frame of a video
        forward pass, ``(b, t)``: each frame's ``0.5 z^2`` and the log-determinants of its
        own tokens (every block's, mapped back from the block's reading order), over the
        frame's dimensions. Their mean over frames is ``nll_per_example``; for a
        time-causal model frame ``k``'s is the NLL of frame ``k`` given the frames before it."""
        z = out.z
        if z.ndim != 5:
            raise ValueError(f"nll_per_frame needs a video forward pass (z of rank 5), got z of shape {tuple(z.shape)}")
        b, t = z.shape[:2]
        dims = z[0, 0].size
        nll = 0.5 * jnp.square(z.astype(jnp.float32)).reshape(b, t, -1).sum(-1)
        for block, ld in zip(self.blocks, out.logdets):
            nll = nll - self._frame_logdet(block, ld, t)
        return nll / dims

    def _frame_logdet(self, block, ld: jax.Array, t: int) -> jax.Array:
        """A block's log-determinant summed over each frame's tokens, ``(b, t)``."""
        ld = ld.astype(jnp.float32)
        b = ld.shape[0]
        if isinstance(block, IdentityBlock):
            return jnp.zeros((b, t), jnp.float32)
        if ld.ndim == 4:  # a frame-local shallow block: (b, t, n, c)
            return ld.sum((2, 3))
        n = ld.shape[1]  # (b, n, c) in the block's reading order
        frame = token_index(n, block.order, block.flip_groups(t)) // (n // t)
        onehot = jnp.asarray(frame[:, None] == np.arange(t)[None, :], jnp.float32)  # (n, t)
        return jnp.einsum("bn,nt->bt", ld.sum(-1), onehot)

    def denoise(self, x: jax.Array, y: jax.Array | None = None, *, remat: bool | str = False) -> jax.Array:
        """The learnable self-denoiser's prediction for ``x`` (the reference's ``denoiser=True``)."""
        if self.learnable_self_denoiser is None:
            raise ValueError("this model has no learnable denoiser (learnable_self_denoiser=False)")
        self.check_inputs(x, y if self.cfg.txt_dim > 0 else None)
        h = patchify(x, self.cfg.patch_size)
        out = self.learnable_self_denoiser(h, y if self.cfg.conditional_denoiser else None, remat=remat)
        return unpatchify(out, self.cfg.patch_size)

    def loss(self, x: jax.Array, y: jax.Array | None = None) -> jax.Array:
        """The reference's per-dimension NLL of ``x`` (no noise augmentation)."""
        out = self(x, y)
        return nll_loss(out.z, out.logdets)
