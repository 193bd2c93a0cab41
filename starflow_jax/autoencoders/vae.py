"""The KL autoencoder of latent diffusion (diffusers' ``AutoencoderKL``, e.g. the
SD-VAE ``stabilityai/sd-vae-ft-ema``) as Flax NNX modules.

The public API takes and returns ``(b, c, h, w)`` arrays like the rest of the
project; inside, everything is channels-last. ``encode`` gives the posterior's
mean and log-variance (float32), ``decode`` the image (float32); the latents the
generator models are ``(z - shift_factor) * scaling_factor`` (``encode_latents`` /
``decode_latents``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from starflow_jax.autoencoders.vae_config import VAEConfig
from starflow_jax.autoencoders.vae_layers import Downsample, GroupNorm, MidBlock, ResnetBlock, Upsample, conv2d

__all__ = ["VAEConfig", "AutoencoderKL", "Encoder", "Decoder", "encode_latents", "decode_latents"]

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


def _dtypes(cfg: VAEConfig) -> dict:
    return dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))


class DownBlock(nnx.Module):
    """``num_layers`` resnets, then (except at the lowest resolution) a downsampler."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_layers: int,
        add_downsample: bool,
        *,
        groups: int,
        dtype,
        param_dtype,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List(
            [
                ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups=groups, **kw)
                for i in range(num_layers)
            ]
        )
        self.downsamplers = nnx.List([Downsample(out_channels, **kw)] if add_downsample else [])

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in (*self.resnets, *self.downsamplers):
            x = layer(x)
        return x


class UpBlock(nnx.Module):
    """``num_layers`` resnets, then (except at the highest resolution) an upsampler."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_layers: int,
        add_upsample: bool,
        *,
        groups: int,
        dtype,
        param_dtype,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List(
            [
                ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups=groups, **kw)
                for i in range(num_layers)
            ]
        )
        self.upsamplers = nnx.List([Upsample(out_channels, **kw)] if add_upsample else [])

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in (*self.resnets, *self.upsamplers):
            x = layer(x)
        return x


class Encoder(nnx.Module):
    """Image ``(b, h, w, in_channels)`` to the posterior moments ``(b, h/f, w/f, 2 * latent_channels)``."""

    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
        kw, chans, g = dict(**_dtypes(cfg), rngs=rngs), cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = conv2d(cfg.in_channels, chans[0], 3, **kw)
        self.down_blocks = nnx.List(
            [
                DownBlock(chans[max(i - 1, 0)], c, cfg.layers_per_block, i < len(chans) - 1, groups=g, **kw)
                for i, c in enumerate(chans)
            ]
        )
        self.mid_block = MidBlock(chans[-1], groups=g, add_attention=cfg.mid_block_add_attention, **kw)
        self.conv_norm_out = GroupNorm(g, chans[-1], param_dtype=kw["param_dtype"])
        self.conv_out = conv2d(chans[-1], 2 * cfg.latent_channels, 3, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    """Latent ``(b, h, w, latent_channels)`` to the image ``(b, h*f, w*f, out_channels)``."""

    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
        kw, g = dict(**_dtypes(cfg), rngs=rngs), cfg.norm_num_groups
        chans = tuple(reversed(cfg.block_out_channels))
        self.conv_in = conv2d(cfg.latent_channels, chans[0], 3, **kw)
        self.mid_block = MidBlock(chans[0], groups=g, add_attention=cfg.mid_block_add_attention, **kw)
        self.up_blocks = nnx.List(
            [
                UpBlock(chans[max(i - 1, 0)], c, cfg.layers_per_block + 1, i < len(chans) - 1, groups=g, **kw)
                for i, c in enumerate(chans)
            ]
        )
        self.conv_norm_out = GroupNorm(g, chans[-1], param_dtype=kw["param_dtype"])
        self.conv_out = conv2d(chans[-1], cfg.out_channels, 3, **kw)

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
    """The KL autoencoder; parameter names follow diffusers' state dict."""

    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        kw = dict(**_dtypes(cfg), rngs=rngs)
        c = cfg.latent_channels
        self.encoder = Encoder(cfg, rngs=rngs)
        self.decoder = Decoder(cfg, rngs=rngs)
        self.quant_conv = conv2d(2 * c, 2 * c, 1, **kw) if cfg.use_quant_conv else None
        self.post_quant_conv = conv2d(c, c, 1, **kw) if cfg.use_post_quant_conv else None

    def _check(self, x: jax.Array, channels: int, what: str) -> None:
        if x.ndim != 4:
            raise ValueError(f"{what} must be a batch (b, c, h, w); got rank {x.ndim}, shape {tuple(x.shape)}")
        if x.shape[1] != channels:
            raise ValueError(
                f"{what} has {x.shape[1]} channels (axis 1 of shape {tuple(x.shape)}), the VAE expects {channels}"
            )

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Image ``(b, in_channels, h, w)`` to the posterior ``(mean, logvar)``, each
        ``(b, latent_channels, h/f, w/f)`` in float32, logvar clipped to [-30, 20]."""
        self._check(x, self.cfg.in_channels, "x")
        h = self.encoder(jnp.transpose(x, (0, 2, 3, 1)).astype(self.cfg.dtype))
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        h = jnp.transpose(h, (0, 3, 1, 2)).astype(jnp.float32)
        mean, logvar = jnp.split(h, 2, axis=1)
        return mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)

    def decode(self, z: jax.Array) -> jax.Array:
        """Latent ``(b, latent_channels, h, w)`` (unscaled) to the image
        ``(b, out_channels, h*f, w*f)`` in float32."""
        self._check(z, self.cfg.latent_channels, "z")
        h = jnp.transpose(z, (0, 2, 3, 1)).astype(self.cfg.dtype)
        if self.post_quant_conv is not None:
            h = self.post_quant_conv(h)
        return jnp.transpose(self.decoder(h), (0, 3, 1, 2)).astype(jnp.float32)

    def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """Round trip: decode the posterior mean (or a sample of the posterior with ``key``)."""
        mean, logvar = self.encode(x)
        return self.decode(sample_posterior(mean, logvar, key))


def sample_posterior(mean: jax.Array, logvar: jax.Array, key: jax.Array | None = None) -> jax.Array:
    """The posterior mean, or ``mean + exp(logvar / 2) * eps`` with ``eps ~ N(0, 1)`` from ``key``."""
    if key is None:
        return mean
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)


def encode_latents(vae: AutoencoderKL, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
    """Images ``(b, c, h, w)`` in [-1, 1] to the generator's latents
    ``(z - shift_factor) * scaling_factor``, ``z`` the posterior mean (or a sample with ``key``)."""
    z = sample_posterior(*vae.encode(x), key)
    return (z - (vae.cfg.shift_factor or 0.0)) * vae.cfg.scaling_factor


def decode_latents(vae: AutoencoderKL, z: jax.Array) -> jax.Array:
    """The generator's latents back to images: ``decode(z / scaling_factor + shift_factor)``."""
    return vae.decode(z / vae.cfg.scaling_factor + (vae.cfg.shift_factor or 0.0))
