"""The learnable self-denoiser: a non-causal Transformer over the patch sequence
(block-causal in time with a window for video) that predicts the flow's score."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from starflow_jax.config.model_config import ModelConfig
from starflow_jax.layers.linear import PROJECTION_AXES, dense
from starflow_jax.layers.masks import IndexMask
from starflow_jax.layers.norms import RMSNorm
from starflow_jax.layers.transformer import LayerSpec, apply_stack, create_stack
from starflow_jax.model.flow_block import block_rope

NO_WINDOW = 10000


def block_causal_mask(frames: int, frame_tokens: int, txt_len: int, lookahead: int, window: int | None) -> IndexMask:
    """The video denoiser's attention mask over ``S = txt_len + frames * frame_tokens`` slots.

    Every slot sees the text. Token slots in frame ``f`` see frames
    ``f + lookahead - 1 - window .. f + lookahead - 1``; text slots see frames up to
    ``lookahead - 1`` (the reference's ``get_local_window_mask`` of the non-causal block).
    An index rule (``IndexMask``): ``np.asarray`` materialises it."""
    window = NO_WINDOW if window is None else window
    s = txt_len + frames * frame_tokens

    def fn(q, k):
        kf = (k - txt_len) // frame_tokens
        qf = (q - txt_len) // frame_tokens
        qf_relu = ((q - txt_len) + abs(q - txt_len)) // 2 // frame_tokens  # max(q - txt_len, 0) // frame_tokens
        return (k < txt_len) | ((kf >= qf + lookahead - 1 - window) & (kf <= qf_relu + lookahead - 1))

    return IndexMask((s, s), fn, f"block_causal(lookahead={lookahead}, window={window})")


class Denoiser(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        d = cfg.patch_dim
        self.conditioned = bool(cfg.conditional_denoiser and cfg.txt_dim > 0)
        num_heads = cfg.num_heads or cfg.channels // cfg.head_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, **PROJECTION_AXES)
        self.proj_in = dense(d, cfg.channels, **kw)
        self.proj_out = dense(cfg.channels, d, zero_init=True, **kw)
        self.proj_txt = dense(cfg.txt_dim, cfg.channels, **kw) if self.conditioned else None
        self.spec = LayerSpec(
            channels=cfg.channels,
            head_dim=cfg.head_dim,
            num_heads=num_heads,
            num_kv_heads=cfg.num_kv_heads or num_heads,
            expansion=cfg.expansion,
            norm_type=cfg.norm_type,
            use_swiglu=cfg.use_swiglu,
            use_qk_norm=cfg.use_qk_norm,
            use_post_norm=cfg.use_post_norm,
            use_bias=cfg.use_bias,
            hf_style_rope=cfg.hf_style_rope,
            causal=False,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            attention_impl=cfg.attention_impl,
            attention_block=cfg.attention_block,
        )
        self.attn_blocks = create_stack(self.spec, cfg.denoiser_layers, rngs)
        self.final_norm = RMSNorm(cfg.channels, param_dtype=param_dtype) if cfg.use_final_norm else None

    def __call__(self, x: jax.Array, y: jax.Array | None = None, remat: bool | str = False) -> jax.Array:
        """``x``: patchified ``(b, [t,] h, w, c)``; returns the prediction, same shape."""
        shape = x.shape
        seq = x.reshape(shape[0], -1, shape[-1])
        h = self.proj_in(seq.astype(self.proj_in.kernel[...].dtype))
        txt_len = 0
        if self.conditioned:
            if y is None:
                raise ValueError("the conditional denoiser needs the conditioning y")
            txt = self.proj_txt(y.astype(self.proj_txt.kernel[...].dtype))
            txt_len = txt.shape[1]
            h = jnp.concatenate([txt.astype(h.dtype), h], axis=1)
        mask = None
        if self.cfg.temporal_causal > 0 and len(shape) == 5:
            mask = block_causal_mask(
                shape[1], shape[2] * shape[3], txt_len, self.cfg.temporal_causal, self.cfg.denoiser_window
            )  # static: an index rule
        rope = block_rope(self.cfg, self.spec.head_dim, shape, txt_len, self.conditioned, autoregressive=False)
        h = apply_stack(self.attn_blocks, h, rope, mask, remat=remat)
        h = h[:, txt_len:]
        if self.final_norm is not None:
            h = self.final_norm(h)
        out = self.proj_out(h).astype(jnp.float32)
        return out.reshape(shape)
