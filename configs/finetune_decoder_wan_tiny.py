"""Wan-decoder fine-tuning on moving digits (5-frame clips, upscaled to RGB 32x32): a small CPU-sized run.

starflow-jax finetune-decoder --vae DIR --config configs/finetune_decoder_wan_tiny.py --workdir W --no-perceptual

DIR: a diffusers AutoencoderKLWan directory, e.g. a tiny random one (torch seed 0):

    python -c "import torch, diffusers; torch.manual_seed(0); diffusers.AutoencoderKLWan(base_dim=8, z_dim=4,
    dim_mult=[1, 2, 2, 2], num_res_blocks=1, latents_mean=[0.1, -0.2, 0.0, 0.3],
    latents_std=[1.5, 0.8, 1.0, 2.0]).save_pretrained('DIR')"

Expect the held-out noisy-latent MSE (16 held-out clips) to fall from the frozen decoder's
0.2233 to ~0.14 by step 10 and end at 0.1448 after the 100 steps (it plateaus there: the tiny
random encoder's latents carry little under noise_std 0.3), in ~160 s of steps (~3 min with
compilation) on a shared 2-core CPU; the result in W/vae (a diffusers
AutoencoderKLWan directory) that `starflow-jax sample --vae W/vae` decodes a video model's
latents with (4 latent channels; a Wan2.2 VAE's temporal latent scale: pass DIR:SCALE to
both commands, the directory does not record it).
"""

import ml_collections

from starflow_jax.config.decoder_loss import decoder_loss_section
from starflow_jax.config.finetune import finetune_section
from starflow_jax.config.training import mesh_section


def get_config():
    return ml_collections.ConfigDict(
        dict(
            finetune=finetune_section(
                steps=100,
                batch_size=4,
                image_size=32,
                frames=5,
                lr=1e-3,
                warmup_steps=0,
                log_every=10,
                heldout_images=16,
                checkpoint_every=50,
            ),
            decoder_loss=decoder_loss_section(discriminator_channels=32, discriminator_stages=2),
            mesh=mesh_section(),  # every device on data: the batch split over them (--set mesh.fsdp=2: weights too)
        )
    )
