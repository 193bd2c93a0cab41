"""Layers of the KL autoencoder, channels-last ``(b, h, w, c)``: group norm, the
resnet block, the stride-2 downsampler, the nearest-neighbour upsampler and the
single-head spatial self-attention of the mid block.

Attribute names follow diffusers' module names (``norm1``, ``conv1``,
``conv_shortcut``, ``group_norm``, ``to_q`` ...) so that the weight conversion is a
renaming plus layout changes. Convolutions and dense layers run in ``dtype``; the
norms and the attention softmax compute in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from starflow_jax.layers.linear import TORCH_KERNEL_INIT, dense


def conv2d(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    *,
    stride: int = 1,
    padding=None,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
) -> nnx.Conv:
    """A convolution initialised like ``torch.nn.Conv2d``; its ``kernel`` is HWIO.

    ``padding`` defaults to ``kernel_size // 2`` on every side (torch's ``padding=k//2``)."""
    if padding is None:
        p = kernel_size // 2
        padding = ((p, p), (p, p))
    bound = 1.0 / float(in_channels * kernel_size * kernel_size) ** 0.5

    def bias_init(key, shape, dtype=param_dtype):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return nnx.Conv(
        in_channels,
        out_channels,
        (kernel_size, kernel_size),
        strides=stride,
        padding=padding,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=TORCH_KERNEL_INIT,
        bias_init=bias_init,
        precision=None,
        rngs=rngs,
    )


class GroupNorm(nnx.Module):
    """``torch.nn.GroupNorm`` over the last (channel) axis, computed in float32;
    parameters ``weight``/``bias`` as in torch."""

    def __init__(self, num_groups: int, channels: int, *, eps: float = 1e-6, param_dtype=jnp.float32):
        if channels % num_groups:
            raise ValueError(f"GroupNorm: {channels} channels are not divisible by {num_groups} groups")
        self.num_groups, self.eps = num_groups, eps
        self.weight = nnx.Param(jnp.ones((channels,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((channels,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        shape = x.shape
        h = x.astype(jnp.float32).reshape(shape[0], -1, self.num_groups, shape[-1] // self.num_groups)
        mean = jnp.mean(h, axis=(1, 3), keepdims=True)
        var = jnp.mean(jnp.square(h - mean), axis=(1, 3), keepdims=True)
        h = ((h - mean) * jax.lax.rsqrt(var + self.eps)).reshape(shape)
        return (h * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


class ResnetBlock(nnx.Module):
    """norm1 -> SiLU -> conv1 -> norm2 -> SiLU -> conv2, plus the input (through a 1x1
    ``conv_shortcut`` when the channel count changes). No time embedding, no dropout."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        groups: int,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = GroupNorm(groups, in_channels, param_dtype=param_dtype)
        self.conv1 = conv2d(in_channels, out_channels, 3, **kw)
        self.norm2 = GroupNorm(groups, out_channels, param_dtype=param_dtype)
        self.conv2 = conv2d(out_channels, out_channels, 3, **kw)
        self.conv_shortcut = conv2d(in_channels, out_channels, 1, **kw) if in_channels != out_channels else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        skip = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        return skip + h


class Downsample(nnx.Module):
    """Halve the side: zero-pad one row at the bottom and one column at the right,
    then a 3x3 convolution with stride 2 and no padding (diffusers' ``padding=0``)."""

    def __init__(self, channels: int, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.conv = conv2d(
            channels, channels, 3, stride=2, padding=((0, 1), (0, 1)), dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


class Upsample(nnx.Module):
    """Double the side: nearest-neighbour x2, then a 3x3 convolution."""

    def __init__(self, channels: int, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.conv = conv2d(channels, channels, 3, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return self.conv(x)


class SpatialAttention(nnx.Module):
    """Single-head self-attention over all positions of a feature map, with a group
    norm in front and a residual connection (the VAE mid block's ``Attention``)."""

    def __init__(self, channels: int, *, groups: int, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.group_norm = GroupNorm(groups, channels, param_dtype=param_dtype)
        self.to_q = dense(channels, channels, **kw)
        self.to_k = dense(channels, channels, **kw)
        self.to_v = dense(channels, channels, **kw)
        self.to_out = dense(channels, channels, **kw)
        self.scale = float(channels) ** -0.5

    def __call__(self, x: jax.Array) -> jax.Array:
        b, hgt, wid, c = x.shape
        h = self.group_norm(x).reshape(b, hgt * wid, c)
        q, k, v = self.to_q(h), self.to_k(h), self.to_v(h)
        logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32) * self.scale
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = self.to_out(jnp.einsum("bqk,bkc->bqc", weights, v))
        return x + out.reshape(b, hgt, wid, c)


class MidBlock(nnx.Module):
    """resnet -> attention (optional) -> resnet at the lowest resolution."""

    def __init__(
        self,
        channels: int,
        *,
        groups: int,
        add_attention: bool = True,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List([ResnetBlock(channels, channels, groups=groups, **kw) for _ in range(2)])
        self.attentions = nnx.List([SpatialAttention(channels, groups=groups, **kw)] if add_attention else [])

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)
