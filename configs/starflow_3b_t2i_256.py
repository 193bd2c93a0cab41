"""STARFlow 3B text-to-image at 256x256: the reference's
``configs/starflow_3B_t2i_256x256.yaml`` as a training config.

The flow models SD-VAE latents (256 / 8 = 32, 4 channels) conditioned on
FLAN-T5-XL embeddings (width 2048, 128 tokens). 3,858,281,544 parameters
(deep block 2,725,205,004), as the reference counts them.

    starflow-jax precompute --images imgs --captions captions.tsv --vae sd-vae-ft-ema \\
        --text-encoder flan-t5-xl --out shards --image-size 256 --txt-size 128
    starflow-jax train --config configs/starflow_3b_t2i_256.py --workdir workdirs/3b --set data.path=shards
    starflow-jax sample --workdir workdirs/3b --prompt "a red cat" --text-encoder flan-t5-xl --vae sd-vae-ft-ema \\
        --cfg 2.5 --jacobi --out cat.png

The reference's recipe: noise_std 0.3, global batch 1024, AdamW (0.9, 0.95, weight decay
1e-4) at 6.4e-5 decaying to 1e-6, 10% dropped captions, latent-norm penalty 1e-4, no
gradient clipping (its default), previews at guidance 2.5
every 10 of its epochs. ``steps`` and ``warmup_steps`` are its script's defaults: 1000
epochs of 50,000 samples, one epoch of warmup. The reference's horizontal flips are off
(``no_flip``): precompute stores one crop per image. FSDP over every chip of a v5p-128
(64 chips: 16 images per chip), matmuls in bfloat16. The reference trains without gradient
checkpointing on its GPUs; here, with 16 images per chip, that needs 139.6 GiB of
temporaries per chip, so every layer is rematerialised (``remat="full"``: 12.4 GiB per
chip, and the lowest roofline bound of the policies that fit, 1.10 s per step against
1.24-1.69 s for dots / proj / offload):

    starflow-jax plan --config configs/starflow_3b_t2i_256.py --topology v5p:4x4x4 --remat none,full,dots,proj,offload

Expected result: not measured here (the reference reports its released checkpoint's samples only).
"""

import ml_collections

from starflow_jax.config import data_section, eval_section, mesh_section, model_section, sample_section, train_section


def get_config():
    config = ml_collections.ConfigDict()
    config.name = "starflow_3b_t2i_256"
    config.model = model_section(
        in_channels=4,
        img_size=32,
        patch_size=1,
        channels=3072,
        num_blocks=6,
        layers_per_block=(2, 2, 2, 2, 2, 24),
        head_dim=64,
        rope=True,
        sos=True,
        txt_size=128,
        txt_dim=2048,
        cond_top_only=True,
        use_softplus=True,
        use_final_norm=True,
        soft_clip=4.0,
        seq_order="L2R",
        dtype="bfloat16",
    )  # matmuls in bfloat16, parameters and Adam state in float32 (the reference trains
    # under bfloat16 autocast)
    config.autoencoder = ml_collections.ConfigDict(dict(name="stabilityai/sd-vae-ft-ema", downsample_factor=8))
    config.text_encoder = ml_collections.ConfigDict(dict(name="google/flan-t5-xl", width=2048))
    # each section: the defaults of starflow_jax/config/training.py, changed only where named
    config.data = data_section(name="array_record")  # set data.path: `starflow-jax precompute` shards
    config.train = train_section(
        steps=48_000,
        warmup_steps=48,
        batch_size=1024,
        lr=6.4e-5,
        min_lr=1e-6,
        noise_std=0.3,
        drop_label=0.1,
        latent_norm_regularization=1e-4,
        grad_clip=0.0,
        remat="full",
        log_every=100,
        eval_every=4800,
        checkpoint_every=1000,
    )
    config.mesh = mesh_section(data=1, fsdp=-1)
    config.eval = eval_section()
    config.sample = sample_section(num=16, cfg=2.5, every=480)
    return config
