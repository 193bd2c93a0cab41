"""STARFlow 3B text-to-image at 256x256: the reference's
``configs/starflow_3B_t2i_256x256.yaml`` as an ml-collections config.

The flow models SD-VAE latents (256 / 8 = 32, 4 channels) conditioned on
FLAN-T5-XL embeddings (width 2048, 128 tokens). 3,858,281,544 parameters
(deep block 2,725,205,004), as the reference counts them.
"""
import ml_collections

from starflow_jax.config import model_section


def get_config():
    config = ml_collections.ConfigDict()
    config.name = "starflow_3b_t2i_256"
    config.model = model_section(
        in_channels=4, img_size=32, patch_size=1, channels=3072, num_blocks=6,
        layers_per_block=(2, 2, 2, 2, 2, 24), head_dim=64, rope=True, sos=True, txt_size=128, txt_dim=2048,
        cond_top_only=True, use_softplus=True, use_final_norm=True, soft_clip=4.0, seq_order="L2R")
    # The rest of the reference YAML: data, autoencoder, text encoder, training.
    config.data = ml_collections.ConfigDict(dict(image_size=256, no_flip=True, wds=True))
    config.autoencoder = ml_collections.ConfigDict(dict(name="stabilityai/sd-vae-ft-ema", downsample_factor=8))
    config.text_encoder = ml_collections.ConfigDict(dict(name="google/flan-t5-xl", width=2048))
    config.train = ml_collections.ConfigDict(dict(
        noise_std=0.3, batch_size=1024, lr=6.4e-5, min_lr=1e-6, drop_label=0.1, cfg=2.5,
        latent_norm_regularization=1e-4, gradient_checkpoint=0, fsdp=True, fsdp_text_encoder=True,
        sample_freq=10))
    return config
