"""Autoencoders whose latents the flow models: the KL autoencoder of latent diffusion
(diffusers' ``AutoencoderKL``, the SD-VAE), the Wan video autoencoder (diffusers'
``AutoencoderKLWan``, Wan2.1 and Wan2.2) and their weight conversion from diffusers."""

from starflow_jax.autoencoders.convert_vae import load_diffusers_checkpoint, vae_from_diffusers
from starflow_jax.autoencoders.convert_wan import wan_from_diffusers
from starflow_jax.autoencoders.export_vae import export_vae_to_diffusers
from starflow_jax.autoencoders.vae import AutoencoderKL, decode_latents, encode_latents, sample_posterior
from starflow_jax.autoencoders.vae_config import VAEConfig, VAEConfigError
from starflow_jax.autoencoders.wan_config import WanVAEConfig, WanVAEConfigError, split_vae_name
from starflow_jax.autoencoders.wan_vae import AutoencoderKLWan, decode_video, encode_video

__all__ = [
    "AutoencoderKL",
    "AutoencoderKLWan",
    "VAEConfig",
    "VAEConfigError",
    "WanVAEConfig",
    "WanVAEConfigError",
    "decode_latents",
    "decode_video",
    "encode_latents",
    "encode_video",
    "export_vae_to_diffusers",
    "load_diffusers_checkpoint",
    "sample_posterior",
    "split_vae_name",
    "vae_from_diffusers",
    "wan_from_diffusers",
]
