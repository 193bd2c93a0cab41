"""Autoencoders whose latents the flow models: the KL autoencoder of latent diffusion
(diffusers' ``AutoencoderKL``, the SD-VAE) and its weight conversion from diffusers."""
from starflow_jax.autoencoders.convert_vae import load_diffusers_checkpoint, vae_from_diffusers
from starflow_jax.autoencoders.vae import (AutoencoderKL, decode_latents, encode_latents,
                                           sample_posterior)
from starflow_jax.autoencoders.vae_config import VAEConfig, VAEConfigError

__all__ = ["AutoencoderKL", "VAEConfig", "VAEConfigError", "decode_latents", "encode_latents",
           "load_diffusers_checkpoint", "sample_posterior", "vae_from_diffusers"]
