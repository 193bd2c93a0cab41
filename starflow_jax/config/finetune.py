"""The training settings of decoder fine-tuning (the reference's ``finetune_decoder.py``):
every key once, with its default and where in the reference it comes from.
``finetune_section(**values)`` builds the section, naming only what differs; an unknown key
is an error. The losses' weights are ``config/decoder_loss.py``'s section.

Per step, as the reference: latents ``z1 = posterior sample * scaling_factor`` of the
frozen encoder (the Wan video VAE: ``(sample - latents_mean) / latents_std`` of clips of
``frames`` frames), ``z = z1 + noise_std * N(0, 1)``; one AdamW step of the decoder (and
``post_quant_conv``: every VAE parameter with a gradient) on the generator loss of
``decode(z)``; then one AdamW step of the discriminator on the same reconstructions.
"""

from __future__ import annotations

import ml_collections

from starflow_jax.config.model_config import ConfigError

# fd.py = finetune_decoder.py, tp = train.py's get_tarflow_parser defaults,
# CLRS = utils/training.py's CosineLRSchedule
FINETUNE_DEFAULTS = dict(
    steps=1000,  # tp: epochs = 1000 (x batches per epoch); here a number of steps
    batch_size=128,  # tp: batch_size = 128 (global)
    image_size=32,  # tp: img_size = 32
    noise_std=0.3,  # tp: noise_std = 0.3 (Gaussian, noise_type = "gaussian": fd.py asserts it)
    lr=1e-4,  # tp: lr = 1e-4 (decoder and discriminator alike)
    min_lr=1e-6,  # tp: min_lr = 1e-6
    b1=0.9,  # fd.py: AdamW betas = (0.9, 0.999), both optimizers
    b2=0.999,
    weight_decay=1e-4,  # fd.py: AdamW weight_decay = 1e-4, both optimizers
    warmup_steps=10_000,  # fd.py: CosineLRSchedule(optimizer, 10_000, ...) for the decoder
    discriminator_lr=1e-4,  # fd.py: the discriminator's AdamW takes args.lr too
    discriminator_warmup_steps=-1,  # fd.py: CLRS warmup = batches per epoch; -1 = one epoch of the data
    seed=100,  # fd.py: utils.set_random_seed(100 + rank)
    log_every=10,  # fd.py: prints every 10 iterations
    heldout_images=64,  # ours: held-out images for the noisy-latent reconstruction error
    num_train=1500,  # ours: digits train / held-out split (data/digits.py)
    images="",  # ours: "" = the embedded digits; else an image folder root/<class>/<image> (fd.py: utils.get_data)
    frames=1,  # ours: frames per training clip, a Wan VAE only (1 + 4k; 1 = images as one-frame clips)
    videos="",  # ours: frames > 1: a video folder (videos with <name>.txt captions); "" = moving digits
    shards="",  # ours: `precompute --keep-pixels` shards (their images or clips; held out: as an image folder)
    checkpoint_every=500,  # ours (fd.py saves the VAE once per epoch, no optimizer state): orbax, resumable
    keep_checkpoints=2,  # ours: the newest checkpoints kept
)


def finetune_section(**values) -> ml_collections.ConfigDict:
    """A fine-tuning section: FINETUNE_DEFAULTS with ``values`` applied."""
    unknown = sorted(set(values) - set(FINETUNE_DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown finetune config keys: {unknown} (the keys: {sorted(FINETUNE_DEFAULTS)})")
    return ml_collections.ConfigDict({**FINETUNE_DEFAULTS, **values})
