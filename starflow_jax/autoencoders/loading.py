"""Open the autoencoder a diffusers directory holds, whichever kind it is: the SD-VAE
(``AutoencoderKL``, images; videos frame by frame) or the Wan video VAE
(``AutoencoderKLWan``, causal in time), with one interface for sampling and precompute."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np

from starflow_jax.autoencoders.convert_vae import vae_from_diffusers
from starflow_jax.autoencoders.convert_wan import wan_from_diffusers
from starflow_jax.autoencoders.vae import decode_latents, encode_latents
from starflow_jax.autoencoders.wan_vae import decode_video, encode_video


@dataclasses.dataclass
class Autoencoder:
    """``kind``: ``"image"`` (SD-VAE) or ``"video"`` (Wan); ``model`` the Flax module;
    ``latent_channels``, ``spatial`` (pixels per latent pixel) and ``temporal`` (pixel frames
    per latent frame after the first; 1 for an image VAE)."""

    kind: str
    model: Any
    latent_channels: int
    spatial: int
    temporal: int
    pixel_channels: int

    def pixel_frames(self, latent_frames: int) -> int:
        return 1 + (latent_frames - 1) * self.temporal if self.kind == "video" else latent_frames

    def encode(self, x) -> np.ndarray:
        """Pixels in [-1, 1], ``(b, c, h, w)`` images or ``(b, t, c, h, w)`` videos (Wan:
        ``t = 1 + 4k``), to the flow's latents (posterior mean)."""
        from flax import nnx

        x = np.asarray(x, np.float32)
        if self.kind == "video":
            return np.asarray(encode_video(self.model, x))
        flat = x.reshape((-1,) + x.shape[-3:])
        z = np.asarray(nnx.jit(encode_latents)(self.model, flat))
        return z.reshape(x.shape[:-3] + z.shape[-3:])

    def decode(self, z, batch: int = 4) -> np.ndarray:
        """The flow's latents back to pixels in [-1, 1] (a Wan latent video of ``t`` frames
        to ``1 + 4 (t - 1)`` frames, decoded chunk by chunk; the SD-VAE a few frames at a time)."""
        from flax import nnx

        z = np.asarray(z, np.float32)
        if self.kind == "video":
            return np.asarray(decode_video(self.model, z))
        dec = nnx.jit(decode_latents)
        flat = z.reshape((-1,) + z.shape[-3:])
        out = np.concatenate([np.asarray(dec(self.model, flat[i : i + batch])) for i in range(0, flat.shape[0], batch)])
        return out.reshape(z.shape[:-3] + out.shape[-3:])


def _class_name(path: str) -> str:
    cfg = os.path.join(path, "config.json")
    if not os.path.isfile(cfg) and os.path.isfile(os.path.join(path, "vae", "config.json")):
        cfg = os.path.join(path, "vae", "config.json")
    if not os.path.isfile(cfg):
        raise FileNotFoundError(f"{path!r} has no config.json (nor vae/config.json): not a diffusers model directory")
    with open(cfg) as f:
        return json.load(f).get("_class_name", "AutoencoderKL")


def load_autoencoder(spec: str) -> Autoencoder:
    """``spec``: a diffusers directory (or a pipeline with a ``vae/`` folder), optionally
    followed by ``:SCALE``, the reference's temporal latent scale of a Wan VAE (e.g.
    ``.../Wan2.2-TI2V-5B-Diffusers:0.6``)."""
    path, scale = spec, None
    head, sep, tail = spec.rpartition(":")
    if sep and head and not os.path.exists(spec):
        try:
            path, scale = head, float(tail)
        except ValueError:
            pass
    if not os.path.exists(path):
        raise FileNotFoundError(f"--vae {path} does not exist")
    name = _class_name(path)
    if name == "AutoencoderKLWan":
        m = wan_from_diffusers(path, temporal_latent_scale=scale)
        return Autoencoder(
            "video", m, m.cfg.z_dim, m.cfg.spatial_compression, m.cfg.temporal_compression, m.cfg.pixel_out_channels
        )
    if name == "AutoencoderKL":
        if scale is not None:
            raise ValueError(
                f"a temporal latent scale (':{scale}') applies to a Wan video VAE, {path} holds an AutoencoderKL"
            )
        vae_dir = path if os.path.isfile(os.path.join(path, "config.json")) else os.path.join(path, "vae")
        m = vae_from_diffusers(vae_dir)
        return Autoencoder("image", m, m.cfg.latent_channels, m.cfg.downsample_factor, 1, m.cfg.in_channels)
    raise ValueError(f"{path} holds a {name}; --vae takes an AutoencoderKL (SD-VAE) or AutoencoderKLWan")
