"""The Wan video autoencoder (diffusers' ``AutoencoderKLWan``: Wan2.1 and Wan2.2) as Flax
NNX modules, with the causal frame cache as an explicit pytree.

The public API takes and returns channels-first videos ``(b, t, c, h, w)`` like the rest of
the project; inside, everything is channels-last ``(b, t, h, w, c)``. A video has
``1 + 4k`` frames; its latent ``1 + k * 4 / temporal_compression`` frames (``1 + k`` for the
released models): the first frame is encoded on its own, then every 4 frames.

- ``vae.encode(x)`` / ``vae.decode(z)``: the whole video in one pass (one program; memory
  grows with the frame count);
- ``vae.encode_chunk`` / ``vae.decode_chunk``: one chunk, carrying the causal cache
  (``cache=None`` for the chunk that starts the video). diffusers runs the encoder on frame 0
  and then on chunks of 4 frames, and the decoder one latent frame at a time; chunk by chunk
  and whole give the same result (to rounding);
- ``encode_video`` / ``decode_video``: the generator's latents ``(z - latents_mean) /
  latents_std`` (and the temporal latent scale on frames after the first, as the STARFlow-V
  reference does for Wan2.2), images ``(b, c, h, w)`` as one-frame videos, and chunked
  execution with one jitted program per chunk shape (the first chunk, the others), so that
  memory stays flat in the number of frames.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from starflow_jax.autoencoders.wan_config import ENCODE_CHUNK, WanVAEConfig
from starflow_jax.autoencoders.wan_layers import (
    AttentionBlock,
    Resample,
    ResidualBlock,
    RMSNorm,
    avg_down,
    conv3d,
    dup_up,
    patchify,
    unpatchify,
)

__all__ = [
    "WanVAEConfig",
    "AutoencoderKLWan",
    "encode_video",
    "decode_video",
    "normalize_latents",
    "denormalize_latents",
    "apply_temporal_scale",
]

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


def _kw(cfg: WanVAEConfig, rngs: nnx.Rngs) -> dict:
    return dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)


def _run(layers, x, cache):
    """Cached layers one after the other; the cache is the list of theirs."""
    new = []
    for i, layer in enumerate(layers):
        x, c = layer(x, None if cache is None else cache[i])
        new.append(c)
    return x, new


class MidBlock(nnx.Module):
    """resnet -> attention -> resnet at the lowest resolution."""

    def __init__(self, dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List([ResidualBlock(dim, dim, **kw) for _ in range(2)])
        self.attentions = nnx.List([AttentionBlock(dim, **kw)])

    def __call__(self, x, cache=None):
        get = (lambda i: None) if cache is None else (lambda i: cache[i])
        x, c0 = self.resnets[0](x, get(0))
        x = self.attentions[0](x)
        x, c1 = self.resnets[1](x, get(1))
        return x, [c0, c1]


class ResidualDownBlock(nnx.Module):
    """Wan2.2 encoder level: resnets and a downsampler, plus the input folded down
    (``avg_down``) as a shortcut."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        num_res_blocks: int,
        temporal: bool,
        down: bool,
        *,
        dtype,
        param_dtype,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List(
            [ResidualBlock(in_dim if i == 0 else out_dim, out_dim, **kw) for i in range(num_res_blocks)]
        )
        self.downsampler = Resample(out_dim, "downsample3d" if temporal else "downsample2d", **kw) if down else None
        self.out_dim = out_dim
        self.factor_t, self.factor_s = (2 if temporal and down else 1), (2 if down else 1)

    def __call__(self, x, cache=None):
        shortcut = avg_down(x, self.out_dim, self.factor_t, self.factor_s)
        x, c_res = _run(self.resnets, x, None if cache is None else cache["resnets"])
        new = {"resnets": c_res}
        if self.downsampler is not None:
            x, new["downsampler"] = self.downsampler(x, None if cache is None else cache["downsampler"])
        return x + shortcut, new


class ResidualUpBlock(nnx.Module):
    """Wan2.2 decoder level: ``num_res_blocks + 1`` resnets and an upsampler (to ``out_dim``),
    plus the input unfolded up (``dup_up``) as a shortcut when it upsamples."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        num_res_blocks: int,
        temporal: bool,
        up: bool,
        *,
        dtype,
        param_dtype,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List(
            [ResidualBlock(in_dim if i == 0 else out_dim, out_dim, **kw) for i in range(num_res_blocks + 1)]
        )
        self.upsampler = (
            Resample(out_dim, "upsample3d" if temporal else "upsample2d", upsample_out_dim=out_dim, **kw)
            if up
            else None
        )
        self.out_dim, self.factor_t = out_dim, (2 if temporal else 1)

    def __call__(self, x, cache=None):
        skip = x
        x, c_res = _run(self.resnets, x, None if cache is None else cache["resnets"])
        new = {"resnets": c_res}
        if self.upsampler is not None:
            x, new["upsampler"] = self.upsampler(x, None if cache is None else cache["upsampler"])
            x = x + dup_up(skip, self.out_dim, self.factor_t, 2, first=cache is None)
        return x, new


class UpBlock(nnx.Module):
    """Wan2.1 decoder level: ``num_res_blocks + 1`` resnets and (except at the top) an
    upsampler that halves the channels."""

    def __init__(
        self, in_dim: int, out_dim: int, num_res_blocks: int, mode: str | None, *, dtype, param_dtype, rngs: nnx.Rngs
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List(
            [ResidualBlock(in_dim if i == 0 else out_dim, out_dim, **kw) for i in range(num_res_blocks + 1)]
        )
        self.upsamplers = nnx.List([Resample(out_dim, mode, **kw)] if mode else [])

    def __call__(self, x, cache=None):
        x, c_res = _run(self.resnets, x, None if cache is None else cache["resnets"])
        x, c_up = _run(self.upsamplers, x, None if cache is None else cache["upsamplers"])
        return x, {"resnets": c_res, "upsamplers": c_up}


class Encoder3d(nnx.Module):
    """Patchified video ``(b, t, h, w, in_channels)`` to the moments
    ``(b, t', h/2^L, w/2^L, 2 * z_dim)`` (before ``quant_conv``)."""

    def __init__(self, cfg: WanVAEConfig, *, rngs: nnx.Rngs):
        kw = _kw(cfg, rngs)
        dims = cfg.encoder_dims()
        last = len(cfg.dim_mult) - 1
        self.conv_in = conv3d(cfg.in_channels, dims[0], 3, **kw)
        blocks = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            temporal = i != last and cfg.temperal_downsample[i]
            if cfg.is_residual:
                blocks.append(ResidualDownBlock(cin, cout, cfg.num_res_blocks, temporal, i != last, **kw))
                continue
            for j in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(cin if j == 0 else cout, cout, **kw))
            if i != last:
                blocks.append(Resample(cout, "downsample3d" if temporal else "downsample2d", **kw))
        self.down_blocks = nnx.List(blocks)
        self.mid_block = MidBlock(dims[-1], **kw)
        self.norm_out = RMSNorm(dims[-1], param_dtype=kw["param_dtype"])
        self.conv_out = conv3d(dims[-1], 2 * cfg.z_dim, 3, **kw)

    def __call__(self, x, cache=None):
        get = (lambda k: None) if cache is None else (lambda k: cache[k])
        x, c_in = self.conv_in.step(x, get("conv_in"))
        x, c_down = _run(self.down_blocks, x, get("down_blocks"))
        x, c_mid = self.mid_block(x, get("mid_block"))
        x, c_out = self.conv_out.step(jax.nn.silu(self.norm_out(x)), get("conv_out"))
        return x, {"conv_in": c_in, "down_blocks": c_down, "mid_block": c_mid, "conv_out": c_out}


class Decoder3d(nnx.Module):
    """Latent ``(b, t, h, w, z_dim)`` to the (patchified) video ``(b, t'', h*2^L, w*2^L, out_channels)``."""

    def __init__(self, cfg: WanVAEConfig, *, rngs: nnx.Rngs):
        kw = _kw(cfg, rngs)
        dims = cfg.decoder_dims()
        last = len(cfg.dim_mult) - 1
        ups = tuple(reversed(cfg.temperal_downsample))
        self.conv_in = conv3d(cfg.z_dim, dims[0], 3, **kw)
        self.mid_block = MidBlock(dims[0], **kw)
        blocks = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            up = i != last
            temporal = up and ups[i]
            if cfg.is_residual:
                blocks.append(ResidualUpBlock(cin, cout, cfg.num_res_blocks, temporal, up, **kw))
            else:  # the previous level's upsampler halved the channels
                mode = ("upsample3d" if temporal else "upsample2d") if up else None
                blocks.append(UpBlock(cin // 2 if i > 0 else cin, cout, cfg.num_res_blocks, mode, **kw))
        self.up_blocks = nnx.List(blocks)
        self.norm_out = RMSNorm(dims[-1], param_dtype=kw["param_dtype"])
        self.conv_out = conv3d(dims[-1], cfg.out_channels, 3, **kw)

    def __call__(self, x, cache=None):
        get = (lambda k: None) if cache is None else (lambda k: cache[k])
        x, c_in = self.conv_in.step(x, get("conv_in"))
        x, c_mid = self.mid_block(x, get("mid_block"))
        x, c_up = _run(self.up_blocks, x, get("up_blocks"))
        x, c_out = self.conv_out.step(jax.nn.silu(self.norm_out(x)), get("conv_out"))
        return x, {"conv_in": c_in, "mid_block": c_mid, "up_blocks": c_up, "conv_out": c_out}


class AutoencoderKLWan(nnx.Module):
    """The Wan video autoencoder; parameter names follow diffusers' state dict."""

    def __init__(self, cfg: WanVAEConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        kw = _kw(cfg, rngs)
        self.encoder = Encoder3d(cfg, rngs=rngs)
        self.quant_conv = conv3d(2 * cfg.z_dim, 2 * cfg.z_dim, 1, **kw)
        self.post_quant_conv = conv3d(cfg.z_dim, cfg.z_dim, 1, **kw)
        self.decoder = Decoder3d(cfg, rngs=rngs)

    # ------------------------------------------------------------------ checks
    def check_video(self, x, what: str = "x") -> None:
        """A pixel video ``(b, t, c, h, w)`` this VAE can encode, or a clear ``ValueError``."""
        cfg = self.cfg
        if x.ndim != 5:
            raise ValueError(f"{what} must be a video batch (b, t, c, h, w); got rank {x.ndim}, shape {tuple(x.shape)}")
        _, t, c, h, w = x.shape
        if c != cfg.pixel_channels:
            raise ValueError(
                f"{what} has {c} channels (axis 2 of shape {tuple(x.shape)}), the VAE expects {cfg.pixel_channels}"
            )
        if t < 1 or (t - 1) % ENCODE_CHUNK:
            raise ValueError(
                f"{what} has {t} frames; the Wan VAE encodes 1 + {ENCODE_CHUNK}k frames (1, 5, 9, 13, ...)"
            )
        f = cfg.spatial_compression
        if h % f or w % f:
            raise ValueError(
                f"{what} is {h}x{w}; height and width must be multiples of {f} (the VAE's spatial compression)"
            )

    def check_latents(self, z, what: str = "z") -> None:
        """A latent video ``(b, t, z_dim, h, w)``, or a clear ``ValueError``."""
        if z.ndim != 5:
            raise ValueError(
                f"{what} must be a latent video batch (b, t, c, h, w); got rank {z.ndim}, shape {tuple(z.shape)}"
            )
        if z.shape[2] != self.cfg.z_dim:
            raise ValueError(
                f"{what} has {z.shape[2]} channels (axis 2 of shape {tuple(z.shape)}), the VAE "
                f"expects z_dim={self.cfg.z_dim}"
            )
        if z.shape[1] < 1:
            raise ValueError(f"{what} has no frames")

    # ------------------------------------------------------------------ chunks, channels-last
    def encode_chunk(self, x: jax.Array, cache=None) -> tuple[jax.Array, dict]:
        """Pixel frames ``(b, t, h, w, c)`` (channels-last, not patchified) to the moments
        ``(b, t', h/f, w/f, 2 * z_dim)`` in float32 and the cache for the next chunk."""
        h = patchify(x.astype(self.cfg.dtype), self.cfg.patch)
        h, cache = self.encoder(h, cache)
        return self.quant_conv(h).astype(jnp.float32), cache

    def decode_chunk(self, z: jax.Array, cache=None) -> tuple[jax.Array, dict]:
        """Latent frames ``(b, t, h, w, z_dim)`` (channels-last, unnormalised) to pixel frames
        ``(b, t'', h*f, w*f, c)`` in float32, clamped to [-1, 1], and the next chunk's cache."""
        h = self.post_quant_conv(z.astype(self.cfg.dtype))
        h, cache = self.decoder(h, cache)
        return jnp.clip(unpatchify(h, self.cfg.patch).astype(jnp.float32), -1.0, 1.0), cache

    # ------------------------------------------------------------------ whole videos, channels-first
    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Video ``(b, t, c, h, w)`` (``t = 1 + 4k``) to the posterior ``(mean, logvar)``, each
        ``(b, t', z_dim, h/f, w/f)`` in float32, logvar clipped to [-30, 20]; one pass."""
        self.check_video(x)
        moments, _ = self.encode_chunk(jnp.transpose(x, (0, 1, 3, 4, 2)))
        return split_moments(moments)

    def decode(self, z: jax.Array) -> jax.Array:
        """Latent video ``(b, t, z_dim, h, w)`` (unnormalised) to pixels
        ``(b, 1 + (t-1)*temporal_compression, c, h*f, w*f)`` in [-1, 1]; one pass."""
        self.check_latents(z)
        out, _ = self.decode_chunk(jnp.transpose(z, (0, 1, 3, 4, 2)))
        return jnp.transpose(out, (0, 1, 4, 2, 3))

    def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """Round trip: decode the posterior mean (or a sample of the posterior with ``key``)."""
        mean, logvar = self.encode(x)
        return self.decode(sample_posterior(mean, logvar, key))


def split_moments(moments: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Channels-last moments ``(b, t, h, w, 2z)`` to channels-first ``(mean, logvar)``."""
    h = jnp.transpose(moments, (0, 1, 4, 2, 3))
    mean, logvar = jnp.split(h, 2, axis=2)
    return mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)


def sample_posterior(mean: jax.Array, logvar: jax.Array, key: jax.Array | None = None) -> jax.Array:
    """The posterior mean, or ``mean + exp(logvar / 2) * eps`` with ``eps ~ N(0, 1)`` from ``key``."""
    if key is None:
        return mean
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)


# ---------------------------------------------------------------------- chunked programs
@functools.partial(jax.jit, static_argnums=0)
def _encode_program(graphdef, state, x, cache):
    return nnx.merge(graphdef, state).encode_chunk(x, cache)


@functools.partial(jax.jit, static_argnums=0)
def decode_program(graphdef, state, z, cache):
    """One jitted decoding chunk: latent frames ``z`` and the carried causal-conv cache to
    ``(pixels, new cache)`` (also compiled alone by ``bench vae`` for its memory)."""
    return nnx.merge(graphdef, state).decode_chunk(z, cache)


def encode_moments(vae: AutoencoderKLWan, x_cl: jax.Array, chunked: bool = True) -> jax.Array:
    """Channels-last pixel video ``(b, 1+4k, h, w, c)`` to channels-last moments, either whole
    (one jitted program) or as diffusers does it: frame 0, then chunks of 4 frames, each a
    call of one of two jitted programs (first chunk / the others) carrying the cache."""
    graphdef, state = nnx.split(vae)
    if not chunked:
        return _encode_program(graphdef, state, x_cl, None)[0]
    out, cache = _encode_program(graphdef, state, x_cl[:, :1], None)
    outs = [out]
    for start in range(1, x_cl.shape[1], ENCODE_CHUNK):
        out, cache = _encode_program(graphdef, state, x_cl[:, start : start + ENCODE_CHUNK], cache)
        outs.append(out)
    return jnp.concatenate(outs, axis=1) if len(outs) > 1 else outs[0]


def decode_pixels(vae: AutoencoderKLWan, z_cl: jax.Array, chunked: bool = True) -> jax.Array:
    """Channels-last latent video to channels-last pixels, whole (one jitted program) or one
    latent frame at a time (two jitted programs: the first frame, the others)."""
    graphdef, state = nnx.split(vae)
    if not chunked:
        return decode_program(graphdef, state, z_cl, None)[0]
    outs, cache = [], None
    for i in range(z_cl.shape[1]):
        out, cache = decode_program(graphdef, state, z_cl[:, i : i + 1], cache)
        outs.append(out)
    return jnp.concatenate(outs, axis=1) if len(outs) > 1 else outs[0]


# ---------------------------------------------------------------------- the generator's latents
def _channel_stats(cfg: WanVAEConfig, axis: int, ndim: int):
    shape = [1] * ndim
    shape[axis] = cfg.z_dim
    return (
        jnp.asarray(cfg.latents_mean, jnp.float32).reshape(shape),
        jnp.asarray(cfg.latents_std, jnp.float32).reshape(shape),
    )


def normalize_latents(cfg: WanVAEConfig, z: jax.Array) -> jax.Array:
    """``(z - latents_mean) / latents_std`` per channel; ``z`` is ``(b, t, c, h, w)``."""
    mean, std = _channel_stats(cfg, 2, z.ndim)
    return (z - mean) / std


def denormalize_latents(cfg: WanVAEConfig, z: jax.Array) -> jax.Array:
    """The inverse of ``normalize_latents``: ``z * latents_std + latents_mean``."""
    mean, std = _channel_stats(cfg, 2, z.ndim)
    return z * std + mean


def apply_temporal_scale(z: jax.Array, scale: float, inverse: bool = False) -> jax.Array:
    """The STARFlow-V reference's temporal latent scale: normalised latent frames after the first
    (axis 1 of ``(b, t, c, h, w)``) are multiplied by ``scale`` after encoding and divided by
    it before decoding (``inverse``); the first frame is left as it is."""
    if scale == 1.0 or z.shape[1] < 2:
        return z
    factor = 1.0 / scale if inverse else scale
    return jnp.concatenate([z[:, :1], z[:, 1:] * factor], axis=1)


def _as_video(x: jax.Array, what: str) -> tuple[jax.Array, bool]:
    if x.ndim == 4:
        return x[:, None], True
    if x.ndim == 5:
        return x, False
    raise ValueError(
        f"{what} must be images (b, c, h, w) or videos (b, t, c, h, w); got rank {x.ndim}, shape {tuple(x.shape)}"
    )


def encode_video(
    vae: AutoencoderKLWan,
    x: jax.Array,
    key: jax.Array | None = None,
    *,
    temporal_scale: float | None = None,
    chunked: bool = True,
) -> jax.Array:
    """Videos ``(b, t, c, h, w)`` (``t = 1 + 4k``) or images ``(b, c, h, w)`` in [-1, 1] to the
    generator's latents ``(b, t', z_dim, h/f, w/f)`` (images: ``(b, z_dim, h/f, w/f)``).

    ``z`` is the posterior mean (or a sample with ``key``, drawn before normalising), then
    ``(z - latents_mean) / latents_std``, then frames after the first times ``temporal_scale``
    (default ``vae.cfg.temporal_latent_scale``). ``chunked``: frame 0 then chunks of 4 frames
    through jitted per-chunk programs (memory flat in the frame count), else one pass."""
    x, image = _as_video(jnp.asarray(x), "x")
    vae.check_video(x)
    moments = encode_moments(vae, jnp.transpose(x, (0, 1, 3, 4, 2)), chunked)
    z = normalize_latents(vae.cfg, sample_posterior(*split_moments(moments), key))
    scale = vae.cfg.temporal_latent_scale if temporal_scale is None else float(temporal_scale)
    z = apply_temporal_scale(z, scale)
    return z[:, 0] if image else z


def decode_video(
    vae: AutoencoderKLWan, z: jax.Array, chunked: bool = True, *, temporal_scale: float | None = None
) -> jax.Array:
    """The generator's latents ``(b, t, z_dim, h, w)`` (or ``(b, z_dim, h, w)``) back to pixels
    ``(b, 1 + (t-1)*temporal_compression, c, h*f, w*f)`` (or images ``(b, c, h*f, w*f)``) in
    [-1, 1]: frames after the first divided by ``temporal_scale``, then ``z * latents_std +
    latents_mean``, then decoded one latent frame at a time (``chunked``, memory flat in the
    frame count) or in one pass."""
    z, image = _as_video(jnp.asarray(z), "z")
    vae.check_latents(z)
    scale = vae.cfg.temporal_latent_scale if temporal_scale is None else float(temporal_scale)
    z = denormalize_latents(vae.cfg, apply_temporal_scale(z.astype(jnp.float32), scale, inverse=True))
    out = jnp.transpose(decode_pixels(vae, jnp.transpose(z, (0, 1, 3, 4, 2)), chunked), (0, 1, 4, 2, 3))
    return out[:, 0] if image else out
