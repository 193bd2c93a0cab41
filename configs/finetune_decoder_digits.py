"""Decoder fine-tuning on the embedded digits (upscaled to RGB): a small CPU-sized run.

starflow-jax finetune-decoder --vae DIR --config configs/finetune_decoder_digits.py --workdir W --no-perceptual
"""

import ml_collections

from starflow_jax.config.decoder_loss import decoder_loss_section
from starflow_jax.config.finetune import finetune_section


def get_config():
    return ml_collections.ConfigDict(
        dict(
            finetune=finetune_section(steps=200, batch_size=8, image_size=32, lr=1e-3, warmup_steps=0, log_every=20),
            decoder_loss=decoder_loss_section(discriminator_channels=32, discriminator_stages=2),
        )
    )
