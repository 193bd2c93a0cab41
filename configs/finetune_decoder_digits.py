"""Decoder fine-tuning on the embedded digits (upscaled to RGB): a small CPU-sized run.

starflow-jax finetune-decoder --vae DIR --config configs/finetune_decoder_digits.py --workdir W --no-perceptual

Expect, for a tiny random SD-VAE (diffusers AutoencoderKL, block_out_channels (32, 64), one layer
per block, 8 groups, torch seed 0), the held-out noisy-latent MSE to fall from the frozen
decoder's 0.2275 to ~0.09 by step 60 and end at ~0.107 after the 200 steps (the discriminator
gains from step ~150 on), in ~80 s on a 2-core CPU; the result in W/vae (a diffusers directory).
"""

import ml_collections

from starflow_jax.config.decoder_loss import decoder_loss_section
from starflow_jax.config.finetune import finetune_section
from starflow_jax.config.training import mesh_section


def get_config():
    return ml_collections.ConfigDict(
        dict(
            finetune=finetune_section(steps=200, batch_size=8, image_size=32, lr=1e-3, warmup_steps=0, log_every=20),
            decoder_loss=decoder_loss_section(discriminator_channels=32, discriminator_stages=2),
            mesh=mesh_section(),  # every device on data: the batch split over them (--set mesh.fsdp=2: weights too)
        )
    )
