"""Layers of the Wan video autoencoder, channels-last videos ``(b, t, h, w, c)``.

Time is causal: a convolution with a temporal kernel of 3 sees the current frame and the
two before it, zero frames before the video starts. To run a long video in chunks, every
such convolution hands back the last two frames of its input (its *cache*); the next chunk
prepends them instead of zeros. The cache is an explicit pytree: a layer is called as
``y, cache = layer(x, cache)`` with ``cache=None`` for the chunk that starts the video (then
layers that treat the first frame specially do so) and the returned cache for the next one.
A first chunk may hold any number of frames, so the same code runs a whole video at once
or chunk by chunk, with the same result.

Attribute names follow diffusers' module names (``norm1``, ``conv1``, ``time_conv``,
``to_qkv`` ...) so that the weight conversion is a renaming plus layout changes; the
spatial convolution of a resampler, diffusers' ``resample.1``, is our ``resample``.
Convolutions run in ``dtype``; the RMS norms and the attention softmax in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from starflow_jax.layers.linear import TORCH_KERNEL_INIT

CACHE_T = 2  # frames of past a causal convolution with a temporal kernel of 3 needs


class Conv(nnx.Module):
    """An N-d convolution over channels-last input, initialised like torch's ``ConvNd``;
    ``kernel`` is ``(*window, in, out)`` (torch: ``(out, in, *window)``), ``bias`` ``(out,)``.

    ``padding`` is one ``(before, after)`` pair per window axis (default: none)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        window: tuple[int, ...],
        *,
        strides: tuple[int, ...] | None = None,
        padding=None,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        window = tuple(int(k) for k in window)
        fan_in = in_channels
        for k in window:
            fan_in *= k
        bound = 1.0 / float(fan_in) ** 0.5
        self.kernel = nnx.Param(TORCH_KERNEL_INIT(rngs.params(), (*window, in_channels, out_channels), param_dtype))
        self.bias = nnx.Param(jax.random.uniform(rngs.params(), (out_channels,), param_dtype, -bound, bound))
        self.strides = tuple(strides) if strides is not None else (1,) * len(window)
        self.padding = tuple(tuple(p) for p in padding) if padding is not None else ((0, 0),) * len(window)
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.apply(x, self.kernel[...])

    def apply(self, x: jax.Array, kernel: jax.Array, padding=None) -> jax.Array:
        spatial = "DHW"[3 - (kernel.ndim - 2) :]
        dn = (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C")
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype),
            kernel.astype(self.dtype),
            self.strides,
            self.padding if padding is None else padding,
            dimension_numbers=dn,
        )
        return y + self.bias[...].astype(self.dtype)


class CausalConv3d(Conv):
    """A 3D convolution, causal in time: ``2 * pad_t`` frames of past are prepended (zeros,
    or the cache of the previous chunk), none after; ``pad_s`` on both sides in space."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        window=(3, 3, 3),
        *,
        pad_t: int = 1,
        pad_s: int = 1,
        stride_t: int = 1,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        super().__init__(
            in_channels,
            out_channels,
            window,
            strides=(stride_t, 1, 1),
            padding=((0, 0), (pad_s, pad_s), (pad_s, pad_s)),
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.past = 2 * pad_t

    def __call__(self, x: jax.Array, cache: jax.Array | None = None) -> jax.Array:
        """The convolution of ``x`` after its past: ``cache`` (``past`` frames) or zeros."""
        if self.past and cache is None:  # zeros before the video: padding inside the convolution
            return self.apply(x, self.kernel[...], ((self.past, 0), *self.padding[1:]))
        if self.past:
            x = jnp.concatenate([cache.astype(x.dtype), x], axis=1)
        return super().__call__(x)

    def step(self, x: jax.Array, cache: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        """``(conv(x after cache), the last past frames of cache + x)``: the next chunk's cache."""
        y = self(x, cache)
        cache = jnp.zeros((x.shape[0], self.past, *x.shape[2:]), x.dtype) if cache is None else cache
        return y, keep_last(cache, x, self.past)


def keep_last(cache: jax.Array, x: jax.Array, n: int) -> jax.Array:
    """The last ``n`` frames of ``cache`` followed by ``x`` (axis 1)."""
    return jnp.concatenate([cache.astype(x.dtype), x], axis=1)[:, -n:]


def conv3d(in_channels: int, out_channels: int, kernel: int = 3, **kw) -> CausalConv3d:
    """A causal ``kernel``-cubed convolution (``1``: pointwise, no past)."""
    p = kernel // 2
    return CausalConv3d(in_channels, out_channels, (kernel,) * 3, pad_t=p, pad_s=p, **kw)


class RMSNorm(nnx.Module):
    """diffusers' ``WanRMS_norm`` over the channel (last) axis, in float32:
    ``x / max(|x|, 1e-12) * sqrt(c) * gamma`` (no bias)."""

    def __init__(self, channels: int, *, param_dtype=jnp.float32):
        self.gamma = nnx.Param(jnp.ones((channels,), param_dtype))
        self.scale = float(channels) ** 0.5

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(jnp.square(h), axis=-1, keepdims=True))
        h = h / jnp.maximum(norm, 1e-12) * self.scale * self.gamma[...].astype(jnp.float32)
        return h.astype(x.dtype)


class ResidualBlock(nnx.Module):
    """norm1 -> SiLU -> causal conv1 -> norm2 -> SiLU -> causal conv2, plus the input
    (through a pointwise ``conv_shortcut`` when the channel count changes)."""

    def __init__(self, in_dim: int, out_dim: int, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = RMSNorm(in_dim, param_dtype=param_dtype)
        self.conv1 = conv3d(in_dim, out_dim, 3, **kw)
        self.norm2 = RMSNorm(out_dim, param_dtype=param_dtype)
        self.conv2 = conv3d(out_dim, out_dim, 3, **kw)
        self.conv_shortcut = conv3d(in_dim, out_dim, 1, **kw) if in_dim != out_dim else None

    def __call__(self, x: jax.Array, cache: dict | None = None) -> tuple[jax.Array, dict]:
        get = (lambda k: None) if cache is None else cache.get
        skip = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        h, c1 = self.conv1.step(jax.nn.silu(self.norm1(x)), get("conv1"))
        h, c2 = self.conv2.step(jax.nn.silu(self.norm2(h)), get("conv2"))
        return skip + h, {"conv1": c1, "conv2": c2}


class AttentionBlock(nnx.Module):
    """Single-head self-attention over the positions of each frame (RMS norm in front,
    pointwise ``to_qkv`` and ``proj``, residual). No state across frames."""

    def __init__(self, dim: int, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm = RMSNorm(dim, param_dtype=param_dtype)
        self.to_qkv = Conv(dim, 3 * dim, (1, 1), **kw)
        self.proj = Conv(dim, dim, (1, 1), **kw)
        self.scale = float(dim) ** -0.5

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, hgt, wid, c = x.shape
        frames = x.reshape(b * t, hgt, wid, c)
        qkv = self.to_qkv(self.norm(frames)).reshape(b * t, hgt * wid, 3 * c)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        logits = jnp.einsum("nqc,nkc->nqk", q, k, preferred_element_type=jnp.float32) * self.scale
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("nqk,nkc->nqc", weights, v).reshape(b * t, hgt, wid, c)
        return x + self.proj(out).reshape(b, t, hgt, wid, c)


def _per_frame(fn, x: jax.Array) -> jax.Array:
    b, t = x.shape[:2]
    y = fn(x.reshape(b * t, *x.shape[2:]))
    return y.reshape(b, t, *y.shape[1:])


class Resample(nnx.Module):
    """Spatial x2 up/down sampling, with a temporal one for the ``3d`` modes.

    ``upsample2d``/``upsample3d``: nearest x2 in space, 3x3 conv to ``upsample_out_dim``
    (default ``dim // 2``); ``upsample3d`` first doubles time with a causal ``time_conv``
    to ``2 * dim`` channels whose halves become consecutive frames. The video's first frame
    is not doubled (it passes without the time conv). ``downsample2d``/``downsample3d``: one
    zero row/column at the bottom/right, stride-2 3x3 conv; ``downsample3d`` then halves time
    with a stride-2 temporal conv over the previous frame and the current ones (the first
    frame passes alone)."""

    MODES = ("upsample2d", "upsample3d", "downsample2d", "downsample3d")

    def __init__(
        self,
        dim: int,
        mode: str,
        upsample_out_dim: int | None = None,
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if mode not in self.MODES:
            raise ValueError(f"Resample mode must be one of {self.MODES}, got {mode!r}")
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mode, self.dim = mode, dim
        if mode.startswith("upsample"):
            out = dim // 2 if upsample_out_dim is None else upsample_out_dim
            self.resample = Conv(dim, out, (3, 3), padding=((1, 1), (1, 1)), **kw)
        else:
            self.resample = Conv(dim, dim, (3, 3), strides=(2, 2), padding=((0, 1), (0, 1)), **kw)
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1), pad_t=1, pad_s=0, **kw)
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), pad_t=0, pad_s=0, stride_t=2, **kw)
        else:
            self.time_conv = None

    def _double_time(self, x: jax.Array, cache) -> tuple[jax.Array, jax.Array]:
        y, cache = self.time_conv.step(x, cache)
        b, t, h, w, _ = y.shape
        y = y.reshape(b, t, h, w, 2, self.dim).transpose(0, 1, 4, 2, 3, 5)
        return y.reshape(b, 2 * t, h, w, self.dim), cache

    def __call__(self, x: jax.Array, cache: dict | None = None) -> tuple[jax.Array, dict]:
        new = {}
        if self.mode == "upsample3d":
            if cache is not None:
                x, new["time_conv"] = self._double_time(x, cache["time_conv"])
            elif x.shape[1] > 1:  # the first frame passes, the rest start from zero past
                rest, new["time_conv"] = self._double_time(x[:, 1:], None)
                x = jnp.concatenate([x[:, :1], rest], axis=1)
            else:
                new["time_conv"] = jnp.zeros((x.shape[0], CACHE_T, *x.shape[2:]), x.dtype)
        if self.mode.startswith("upsample"):
            x = _per_frame(lambda f: self.resample(jnp.repeat(jnp.repeat(f, 2, axis=1), 2, axis=2)), x)
        else:
            x = _per_frame(self.resample, x)
        if self.mode == "downsample3d":
            if cache is not None:
                y = self.time_conv(jnp.concatenate([cache["time_conv"].astype(x.dtype), x], axis=1))
            elif x.shape[1] > 1:
                y = jnp.concatenate([x[:, :1], self.time_conv(x)], axis=1)
            else:
                y = x
            new["time_conv"] = x[:, -1:]
            x = y
        return x, new


def avg_down(x: jax.Array, out_channels: int, factor_t: int, factor_s: int) -> jax.Array:
    """diffusers' ``AvgDown3D``: zero frames in front up to a multiple of ``factor_t``, fold
    each ``factor_t x factor_s x factor_s`` block into channels (channel-major), then average
    groups of consecutive folded channels down to ``out_channels``."""
    pad = (-x.shape[1]) % factor_t
    if pad:
        x = jnp.pad(x, ((0, 0), (pad, 0), (0, 0), (0, 0), (0, 0)))
    b, t, h, w, c = x.shape
    ft, fs = factor_t, factor_s
    x = x.reshape(b, t // ft, ft, h // fs, fs, w // fs, fs, c).transpose(0, 1, 3, 5, 7, 2, 4, 6)
    x = x.reshape(b, t // ft, h // fs, w // fs, out_channels, c * ft * fs * fs // out_channels)
    return jnp.mean(x.astype(jnp.float32), axis=-1).astype(x.dtype)


def dup_up(x: jax.Array, out_channels: int, factor_t: int, factor_s: int, first: bool) -> jax.Array:
    """diffusers' ``DupUp3D``, the inverse fold: repeat every channel, unfold the channels
    into ``factor_t x factor_s x factor_s`` blocks; ``first`` drops the first
    ``factor_t - 1`` frames (the video's first frame is not doubled)."""
    b, t, h, w, c = x.shape
    ft, fs = factor_t, factor_s
    x = jnp.repeat(x, out_channels * ft * fs * fs // c, axis=-1)
    x = x.reshape(b, t, h, w, out_channels, ft, fs, fs).transpose(0, 1, 5, 2, 6, 3, 7, 4)
    x = x.reshape(b, t * ft, h * fs, w * fs, out_channels)
    return x[:, ft - 1 :] if first else x


def patchify(x: jax.Array, p: int) -> jax.Array:
    """``(b, t, h, w, c)`` to ``(b, t, h/p, w/p, c*p*p)``; channel ``c*p*p + j*p + i`` holds
    the pixel at row ``i``, column ``j`` of a patch (diffusers' order)."""
    if p == 1:
        return x
    b, t, h, w, c = x.shape
    x = x.reshape(b, t, h // p, p, w // p, p, c).transpose(0, 1, 2, 4, 6, 5, 3)
    return x.reshape(b, t, h // p, w // p, c * p * p)


def unpatchify(x: jax.Array, p: int) -> jax.Array:
    """The inverse of ``patchify``."""
    if p == 1:
        return x
    b, t, h, w, cpp = x.shape
    c = cpp // (p * p)
    x = x.reshape(b, t, h, w, c, p, p).transpose(0, 1, 2, 6, 3, 5, 4)
    return x.reshape(b, t, h * p, w * p, c)
