"""``starflow_3b_t2i_256.py`` in miniature: the same structure and recipe (latent-norm
penalty, no gradient clipping, FSDP over all devices, previews at guidance 2.5) with three
thin blocks on 8x8 SD-VAE latents (64 px images) and 16 caption tokens, for trying the
pod recipe on one machine.

    starflow-jax precompute --images imgs --captions captions.tsv --vae sd-vae-ft-ema \\
        --text-encoder flan-t5-xl --out shards --image-size 64 --txt-size 16
    starflow-jax train --config configs/starflow_3b_t2i_256_tiny.py --workdir workdirs/3b_tiny \\
        --set data.path=shards
"""

import ml_collections

from starflow_jax.config import data_section, eval_section, mesh_section, model_section, sample_section, train_section


def get_config():
    config = ml_collections.ConfigDict()
    config.name = "starflow_3b_t2i_256_tiny"
    config.model = model_section(
        in_channels=4,
        img_size=8,
        patch_size=1,
        channels=64,
        num_blocks=3,
        layers_per_block=(1, 1, 2),
        head_dim=32,
        rope=True,
        sos=True,
        txt_size=16,
        txt_dim=2048,
        cond_top_only=True,
        use_softplus=True,
        use_final_norm=True,
        soft_clip=4.0,
        seq_order="L2R",
    )
    config.autoencoder = ml_collections.ConfigDict(dict(name="stabilityai/sd-vae-ft-ema", downsample_factor=8))
    config.text_encoder = ml_collections.ConfigDict(dict(name="google/flan-t5-xl", width=2048))
    # each section: the defaults of starflow_jax/config/training.py, changed only where named
    config.data = data_section(name="array_record")  # set data.path: `starflow-jax precompute` shards
    config.train = train_section(
        steps=2000,
        warmup_steps=20,
        batch_size=8,
        lr=6.4e-5,
        min_lr=1e-6,
        noise_std=0.3,
        drop_label=0.1,
        latent_norm_regularization=1e-4,
        grad_clip=0.0,
        remat="full",
        log_every=50,
        eval_every=500,
        checkpoint_every=500,
    )
    config.mesh = mesh_section(data=1, fsdp=-1)
    config.eval = eval_section()
    config.sample = sample_section(num=4, cfg=2.5)
    return config
