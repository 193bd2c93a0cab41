"""One TARFlow block: a causal Transformer that predicts, for every token, the affine
transform of that token from the tokens before it (and the text prefix)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from starflow_jax.config.model_config import ModelConfig
from starflow_jax.flow import affine, permutation
from starflow_jax.layers.linear import PROJECTION_AXES, dense
from starflow_jax.layers.norms import RMSNorm
from starflow_jax.layers.rope import rope_table
from starflow_jax.layers.transformer import LayerSpec, apply_stack, create_stack
from starflow_jax.parallel.rules import logical_axes


def block_rope(
    cfg: ModelConfig,
    head_dim: int,
    x_shape: tuple[int, ...],
    txt_len: int,
    conditioned: bool,
    autoregressive: bool = True,
):
    """RoPE tables for a block's slots (text prefix then tokens), or ``None`` without RoPE.

    Images of a model without text use 2D positions; anything with text in the
    model (``txt_size > 0``) or a time axis uses 3D positions, with text slots
    only in blocks that read the text. With ``cfg.rope_content_keys`` (and an
    ``autoregressive`` block, whose token slot ``i`` holds token ``i - 1`` after the
    start token) the tables are ``2 head_dim`` wide: the queries' rotations, then the
    keys', each key at the position of the token it holds (the slot before; the start
    token's slot keeps its own), so that attention sees the offset between the token a
    slot predicts and the token another holds."""
    tables = _block_rope_tables(cfg, head_dim, x_shape, txt_len, conditioned)
    if tables is None:
        return None
    if not (cfg.rope_content_keys and autoregressive):
        return jnp.asarray(tables[0]), jnp.asarray(tables[1])
    prefix = tables[0].shape[0] - int(np.prod(x_shape[1:-1]))
    out = []
    for tab in tables:
        keys = np.concatenate([tab[: prefix + 1], tab[prefix:-1]], axis=0)
        out.append(jnp.asarray(np.concatenate([tab, keys], axis=-1)))
    return tuple(out)


def _block_rope_tables(cfg: ModelConfig, head_dim: int, x_shape: tuple[int, ...], txt_len: int, conditioned: bool):
    if not cfg.rope:
        return None
    h, w = x_shape[-3], x_shape[-2]
    frames = x_shape[1] if len(x_shape) == 5 else 0
    if cfg.txt_size > 0 or frames > 0:
        cos, sin = rope_table(
            head_dim, cfg.txt_size, h, w, txt_len if conditioned else 0, cfg.rope_seq_len, frames, "3d", cfg.rope_wrap
        )
    else:
        cos, sin = rope_table(head_dim, cfg.txt_size, h, w, 0, cfg.rope_seq_len, 0, "2d", cfg.rope_wrap)
    return cos, sin


class FlowBlock(nnx.Module):
    """A flow block with its own reading order (``identity`` or ``flip``)."""

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        channels: int,
        num_heads: int,
        num_layers: int,
        order: str,
        conditioned: bool,
        rngs: nnx.Rngs,
    ):
        self.cfg = cfg
        self.order = order
        self.conditioned = conditioned
        self.channels = channels
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        d = cfg.patch_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, **PROJECTION_AXES)
        self.proj_in = dense(d, channels, **kw)
        self.proj_out = dense(channels, 2 * d, zero_init=True, **kw)
        self.sos_embed = (
            nnx.Param(
                jax.random.normal(rngs.params(), (1, 1, d), param_dtype), **logical_axes(None, "positions", "features")
            )
            if cfg.sos
            else None
        )
        self.pos_embed = (
            nnx.Param(
                jax.random.normal(rngs.params(), (cfg.seq_side**2, channels), param_dtype) * 1e-2,
                **logical_axes("positions", "features"),
            )
            if not cfg.rope
            else None
        )
        self.proj_txt = dense(cfg.txt_dim, channels, **kw) if conditioned else None
        self.spec = LayerSpec(
            channels=channels,
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
            causal=True,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            attention_impl=cfg.attention_impl,
            attention_block=cfg.attention_block,
        )
        self.num_layers = num_layers
        self.attn_blocks = create_stack(self.spec, num_layers, rngs)
        self.final_norm = RMSNorm(channels, param_dtype=param_dtype) if cfg.use_final_norm else None

    # -------------------------------------------------------------- pieces
    def flip_groups(self, frames: int) -> int:
        """Groups a ``flip`` reverses within: every frame for time-causal video models
        (``temporal_causal``: frames stay in time order), else the whole sequence (the
        reference's global flip)."""
        return frames if self.cfg.temporal_causal else 1

    def tokens(self, x: jax.Array) -> tuple[jax.Array, int]:
        """``(b, [t,] h, w, c)`` to the block's reading order ``(b, n, c)``, and the frame count."""
        frames = x.shape[1] if x.ndim == 5 else 1
        return permutation.permute(permutation.flatten_tokens(x), self.order, self.flip_groups(frames)), frames

    def untokens(self, seq: jax.Array, shape: tuple[int, ...], frames: int) -> jax.Array:
        return permutation.permute(seq, self.order, self.flip_groups(frames)).reshape(shape[:-1] + (seq.shape[-1],))

    def keeps_frame_order(self, frames: int) -> bool:
        """Whether the reading order visits the frames in time order (a video prefix of
        whole frames is then a prefix of the sequence)."""
        return frames <= 1 or self.order == permutation.IDENTITY or self.flip_groups(frames) == frames

    def text_prefix(self, y: jax.Array | None) -> jax.Array | None:
        if not self.conditioned:
            return None
        return self.proj_txt(y.astype(self.proj_txt.kernel[...].dtype))

    def positional(self, h: jax.Array, frames: int) -> jax.Array:
        if self.pos_embed is None:
            return h
        pe = self.pos_embed[...]
        if h.shape[1] != pe.shape[0]:
            raise ValueError(
                f"learned position embeddings cover {pe.shape[0]} tokens, input has {h.shape[1]}; "
                "use rope=True for other sizes"
            )
        pe = permutation.permute(pe[None], self.order, self.flip_groups(frames))
        return h + pe.astype(h.dtype)

    def network(
        self, h_tokens: jax.Array, txt: jax.Array | None, rope, temp: float = 1.0, remat: bool | str = False
    ) -> jax.Array:
        """Transformer over ``[text, tokens]``: the raw ``(a, b)`` output of every token slot."""
        h = h_tokens
        prefix = 0
        if txt is not None:
            prefix = txt.shape[1]
            h = jnp.concatenate([txt.astype(h.dtype), h], axis=1)
        h = apply_stack(self.attn_blocks, h, rope, None, temp, remat=remat)
        h = h[:, prefix:]
        if self.final_norm is not None:
            h = self.final_norm(h)
        return affine.soft_clip(self.proj_out(h), self.cfg.soft_clip)

    # -------------------------------------------------------------- forward
    def __call__(self, x: jax.Array, y: jax.Array | None = None, remat: bool | str = False):
        """Data to noise. Returns ``(z, logdet)``: ``z`` shaped like ``x`` and the
        elementwise log-determinant ``(b, n, c)`` in the block's reading order."""
        seq, frames = self.tokens(x)
        x_in = seq
        h = seq
        if self.sos_embed is not None:
            sos = jnp.broadcast_to(self.sos_embed[...].astype(seq.dtype), (seq.shape[0], 1, seq.shape[2]))
            h = jnp.concatenate([sos, seq[:, :-1]], axis=1)
        h = self.proj_in(h.astype(self.proj_in.kernel[...].dtype))
        h = self.positional(h, frames)
        txt = self.text_prefix(y)
        rope = block_rope(self.cfg, self.spec.head_dim, x.shape, 0 if txt is None else txt.shape[1], self.conditioned)
        raw = self.network(h, txt, rope, remat=remat)
        if self.sos_embed is None:
            raw = affine.shift_right(raw)
        a, b = affine.split_raw(raw)
        scale = affine.scale_from_raw(a, self.cfg.use_softplus)
        z, logdet = affine.affine_forward(x_in, scale, b)
        return self.untokens(z, x.shape, frames), logdet


class IdentityBlock(nnx.Module):
    """A block with 0 layers: passes its input through, log-determinant 0."""

    def __init__(self):
        pass

    def __call__(self, x: jax.Array, y: jax.Array | None = None, remat: bool | str = False):
        return x, jnp.zeros((x.shape[0],), jnp.float32)
