"""The T5 encoder (T5 v1.1 / flan-t5 and the original ReLU T5) in Flax NNX.

Numerics follow transformers' ``T5EncoderModel``: RMS layer norms without mean or
bias, computed in float32; self-attention without the ``1/sqrt(d)`` scaling, with a
bucketed relative position bias (bidirectional buckets) held by the first layer and
shared by all layers; padded keys masked with an additive ``finfo(float32).min``; a
gated-GELU (``gelu_new(wi_0 x) * wi_1 x``) or plain (``relu(wi x)``) feed-forward;
a final RMS norm; no dropout.

The layers' parameters are stacked along a leading axis (partition name ``layers``)
and applied with ``nnx.scan``. With ``dtype='bfloat16'`` the matmuls run in bfloat16
while the parameters stay float32 (``param_dtype``) and the residual stream, norms,
attention scores and softmax stay float32; the output is always float32.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from starflow_jax.layers.transformer import LAYER_AXIS

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}

SUPPORTED_MODEL_TYPES = ("t5", "mt5")


def parse_feed_forward_proj(feed_forward_proj: str) -> tuple[bool, str]:
    """``(gated, activation)`` from transformers' ``feed_forward_proj`` (``'relu'``,
    ``'gated-gelu'``, ...); ``'gated-gelu'`` means the tanh GELU (``gelu_new``)."""
    parts = feed_forward_proj.split("-")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
        raise ValueError(f"feed_forward_proj {feed_forward_proj!r} is not of the form 'ACT' or 'gated-ACT'")
    gated, act = len(parts) == 2, parts[-1]
    if feed_forward_proj == "gated-gelu":
        act = "gelu_new"
    if act not in ACTIVATIONS:
        raise ValueError(
            f"feed_forward_proj {feed_forward_proj!r}: activation {act!r} is not supported; "
            f"choose one of {sorted(ACTIVATIONS)}"
        )
    return gated, act


@dataclasses.dataclass(frozen=True)
class T5Config:
    """The encoder's architecture (transformers' ``T5Config`` names and defaults) and the
    compute / parameter dtypes."""

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        for name in (
            "vocab_size",
            "d_model",
            "d_kv",
            "d_ff",
            "num_layers",
            "num_heads",
            "relative_attention_max_distance",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"T5Config.{name} must be a positive integer, got {value!r}")
        buckets = self.relative_attention_num_buckets
        if isinstance(buckets, bool) or not isinstance(buckets, int) or buckets < 4:
            raise ValueError(f"T5Config.relative_attention_num_buckets must be an integer >= 4, got {buckets!r}")
        if self.relative_attention_max_distance <= buckets // 4:
            raise ValueError(
                f"T5Config.relative_attention_max_distance ({self.relative_attention_max_distance}) must exceed "
                f"the exact-position buckets ({buckets // 4}) of relative_attention_num_buckets={buckets}"
            )
        if not self.layer_norm_epsilon > 0:
            raise ValueError(f"T5Config.layer_norm_epsilon must be positive, got {self.layer_norm_epsilon!r}")
        parse_feed_forward_proj(self.feed_forward_proj)
        for name in ("dtype", "param_dtype"):
            value = getattr(self, name)
            if value not in ("float32", "bfloat16", "float16"):
                raise ValueError(f"T5Config.{name} must be 'float32', 'bfloat16' or 'float16', got {value!r}")

    @property
    def gated(self) -> bool:
        return parse_feed_forward_proj(self.feed_forward_proj)[0]

    @property
    def activation(self) -> str:
        return parse_feed_forward_proj(self.feed_forward_proj)[1]

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv

    @classmethod
    def from_transformers_config(
        cls, config: Mapping[str, Any] | Any, *, dtype: str = "float32", param_dtype: str = "float32"
    ) -> T5Config:
        """From a transformers T5 ``config.json`` dict (or a ``T5Config`` object).

        Missing fields take transformers' defaults; decoder-only and training fields
        (``num_decoder_layers``, ``dropout_rate``, ``tie_word_embeddings``, ...) are
        ignored. A decoder config, another model type (umT5 has a relative bias per
        layer), quantisation or an unknown ``feed_forward_proj`` raise ``ValueError``."""
        if hasattr(config, "to_dict") and not isinstance(config, Mapping):
            config = config.to_dict()
        if not isinstance(config, Mapping):
            raise ValueError(f"expected a transformers config dict, got {type(config).__name__}")
        model_type = config.get("model_type", "t5")
        if model_type not in SUPPORTED_MODEL_TYPES:
            extra = " (umT5 has a relative attention bias in every layer)" if model_type == "umt5" else ""
            raise ValueError(
                f"model_type {model_type!r} is not supported; expected one of {list(SUPPORTED_MODEL_TYPES)}{extra}"
            )
        if config.get("is_decoder", False):
            raise ValueError("this is a T5 decoder config (is_decoder=true); only the encoder is supported")
        if config.get("quantization_config") is not None:
            raise ValueError("quantized T5 checkpoints (quantization_config) are not supported")
        defaults = cls()
        fields = (
            "vocab_size",
            "d_model",
            "d_kv",
            "d_ff",
            "num_layers",
            "num_heads",
            "relative_attention_num_buckets",
            "relative_attention_max_distance",
            "layer_norm_epsilon",
            "feed_forward_proj",
        )
        kwargs = {f: config.get(f, getattr(defaults, f)) for f in fields}
        kwargs["layer_norm_epsilon"] = float(kwargs["layer_norm_epsilon"])
        return cls(**kwargs, dtype=dtype, param_dtype=param_dtype)


def relative_position_buckets(query_length: int, key_length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """The encoder's (bidirectional) relative position bucket of every ``(query, key)``
    pair, ``(query_length, key_length)`` int32, computed in float32 like transformers.

    Half of the buckets are for keys after the query; in each half, distances below a
    quarter of ``num_buckets`` have their own bucket and larger ones are binned
    logarithmically up to ``max_distance`` (farther shares the last bucket)."""
    relative = np.arange(key_length)[None, :] - np.arange(query_length)[:, None]
    half = num_buckets // 2
    buckets = (relative > 0).astype(np.int64) * half
    distance = np.abs(relative)
    max_exact = half // 2
    is_small = distance < max_exact
    safe = np.maximum(distance, max_exact).astype(np.float32)  # log of the small ones is never used
    scaled = (
        np.log(safe / np.float32(max_exact))
        / np.float32(math.log(max_distance / max_exact))
        * np.float32(half - max_exact)
    )
    large = np.minimum(max_exact + scaled.astype(np.int64), half - 1)
    return (buckets + np.where(is_small, distance, large)).astype(np.int32)


class T5LayerNorm(nnx.Module):
    """``weight * x / sqrt(mean(x^2) + eps)`` in float32 (no mean, no bias); float32 out."""

    def __init__(self, dim: int, *, eps: float, param_dtype=jnp.float32):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(jnp.square(h), axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(jnp.float32) * h


def _linear(in_features: int, out_features: int, std: float, cfg: T5Config, rngs: nnx.Rngs) -> nnx.Linear:
    """A bias-free dense layer, kernel ``(in, out)``, initialised like transformers (normal)."""
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=False,
        dtype=jnp.dtype(cfg.dtype),
        param_dtype=jnp.dtype(cfg.param_dtype),
        kernel_init=nnx.initializers.normal(std),
        precision=None,
        rngs=rngs,
    )


class T5Attention(nnx.Module):
    """Unscaled multi-head self-attention with an additive bias (position + padding)."""

    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        self.num_heads, self.d_kv = cfg.num_heads, cfg.d_kv
        d, inner = cfg.d_model, cfg.inner_dim
        self.q = _linear(d, inner, (d * cfg.d_kv) ** -0.5, cfg, rngs)
        self.k = _linear(d, inner, d**-0.5, cfg, rngs)
        self.v = _linear(d, inner, d**-0.5, cfg, rngs)
        self.o = _linear(inner, d, inner**-0.5, cfg, rngs)

    def __call__(self, x: jax.Array, position_bias: jax.Array, mask_bias: jax.Array) -> jax.Array:
        b, length, _ = x.shape
        shape = (b, length, self.num_heads, self.d_kv)
        q, k, v = (proj(x).reshape(shape) for proj in (self.q, self.k, self.v))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        scores = scores + position_bias + mask_bias
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, length, self.num_heads * self.d_kv)
        return self.o(out)


class T5FeedForward(nnx.Module):
    """``wo(act(wi_0 x) * wi_1 x)`` (gated) or ``wo(act(wi x))``."""

    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        self.gated, self.activation = cfg.gated, cfg.activation
        d, ff = cfg.d_model, cfg.d_ff
        if self.gated:
            self.wi_0 = _linear(d, ff, d**-0.5, cfg, rngs)
            self.wi_1 = _linear(d, ff, d**-0.5, cfg, rngs)
        else:
            self.wi = _linear(d, ff, d**-0.5, cfg, rngs)
        self.wo = _linear(ff, d, ff**-0.5, cfg, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        act = ACTIVATIONS[self.activation]
        h = act(self.wi_0(x)) * self.wi_1(x) if self.gated else act(self.wi(x))
        return self.wo(h)


class T5Layer(nnx.Module):
    """``x + attention(norm(x))`` then ``x + ff(norm(x))``; the residual stays float32."""

    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        param_dtype = jnp.dtype(cfg.param_dtype)
        self.attention_norm = T5LayerNorm(cfg.d_model, eps=cfg.layer_norm_epsilon, param_dtype=param_dtype)
        self.attention = T5Attention(cfg, rngs=rngs)
        self.ff_norm = T5LayerNorm(cfg.d_model, eps=cfg.layer_norm_epsilon, param_dtype=param_dtype)
        self.ff = T5FeedForward(cfg, rngs=rngs)

    def __call__(self, x: jax.Array, position_bias: jax.Array, mask_bias: jax.Array) -> jax.Array:
        x = x + self.attention(self.attention_norm(x), position_bias, mask_bias).astype(x.dtype)
        return x + self.ff(self.ff_norm(x)).astype(x.dtype)


def create_layers(cfg: T5Config, rngs: nnx.Rngs) -> T5Layer:
    """``cfg.num_layers`` layers whose parameters are stacked along a leading axis."""

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: LAYER_AXIS})
    def create(rngs):
        return T5Layer(cfg, rngs=rngs)

    return create(rngs)


class T5Encoder(nnx.Module):
    """The T5 encoder: token ids ``(b, L)`` and attention mask to hidden states
    ``(b, L, d_model)`` (float32), those of padded positions included (not zeroed)."""

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        self.config = config
        param_dtype = jnp.dtype(config.param_dtype)
        self.embed_tokens = nnx.Embed(
            config.vocab_size,
            config.d_model,
            dtype=jnp.float32,
            param_dtype=param_dtype,
            embedding_init=nnx.initializers.normal(1.0),
            rngs=rngs,
        )
        self.relative_attention_bias = nnx.Param(
            jax.random.normal(rngs.params(), (config.relative_attention_num_buckets, config.num_heads), param_dtype)
            * config.d_model**-0.5
        )
        self.layers = create_layers(config, rngs)
        self.final_layer_norm = T5LayerNorm(config.d_model, eps=config.layer_norm_epsilon, param_dtype=param_dtype)

    def position_bias(self, length: int) -> jax.Array:
        """The relative position bias ``(1, heads, length, length)``, float32."""
        cfg = self.config
        buckets = relative_position_buckets(
            length, length, cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance
        )
        bias = jnp.take(self.relative_attention_bias[...].astype(jnp.float32), jnp.asarray(buckets), axis=0)
        return jnp.transpose(bias, (2, 0, 1))[None]

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(f"input_ids must be integer (batch, length), got {input_ids.dtype} {input_ids.shape}")
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {attention_mask.shape} does not match input_ids {input_ids.shape}")
        # transformers: (1 - mask) * finfo.min, added to the scores of every query, per key
        mask_bias = jnp.where(attention_mask.astype(bool), 0.0, jnp.finfo(jnp.float32).min)
        mask_bias = mask_bias.astype(jnp.float32)[:, None, None, :]
        position_bias = self.position_bias(input_ids.shape[1])
        x = self.embed_tokens(input_ids).astype(jnp.float32)

        def body(h, layer, position_bias, mask_bias):
            return layer(h, position_bias, mask_bias)

        scan = nnx.scan(body, in_axes=(nnx.Carry, 0, None, None), out_axes=nnx.Carry)
        x = scan(x, self.layers, position_bias, mask_bias)
        return self.final_layer_norm(x)
