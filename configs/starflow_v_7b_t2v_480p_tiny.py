"""``starflow_v_7b_t2v_480p.py`` in miniature: the same structure (causal in time,
per-frame shallow blocks, a wider deep block, the learnable denoiser) and recipe
(aspect-ratio buckets, joint image + video batches, drop_image, cond_noise_level, gradient
clip and skip, full remat) with three thin blocks, 48-channel Wan2.2 latents of small
pictures (``--image-size 64``: 4x4 latents for 1:1) and 16 caption tokens, for trying the
pod recipe on one machine. Precompute and train as ``starflow_v_7b_t2v_480p.py`` says,
with ``--image-size 64 --num-frames 9 --txt-size 16`` (3 latent frames) for the clips and
``--image-size 64 --txt-size 16`` for the images.
"""

import ml_collections

from starflow_jax.config import data_section, eval_section, mesh_section, model_section, sample_section, train_section


def get_config():
    config = ml_collections.ConfigDict()
    config.name = "starflow_v_7b_t2v_480p_tiny"
    config.model = model_section(
        in_channels=48,
        img_size=4,
        patch_size=1,
        channels=64,
        top_block_channels=96,
        num_blocks=3,
        layers_per_block=(1, 1, 2),
        head_dim=32,
        rope=True,
        pt_seq_len=4,
        sos=True,
        txt_size=16,
        txt_dim=2048,
        cond_top_only=True,
        use_softplus=True,
        use_final_norm=True,
        soft_clip=4.0,
        seq_order="L2R",
        learnable_self_denoiser=True,
        conditional_denoiser=True,
        denoiser_window=2,
        temporal_causal=2,
        shallow_block_local=True,
    )
    config.autoencoder = ml_collections.ConfigDict(
        dict(
            name="Wan-AI/Wan2.2-TI2V-5B-Diffusers",
            downsample_factor=16,
            temporal_downsample_factor=4,
            temporal_scale=0.6,
            finetuned="none",
        )
    )
    config.text_encoder = ml_collections.ConfigDict(dict(name="google/flan-t5-xl", width=2048))
    # each section: the defaults of starflow_jax/config/training.py, changed only where named
    # set data.path (clip buckets) and data.secondary_path (image buckets): `starflow-jax precompute` shards
    config.data = data_section(name="array_record", vid_size="9:16", mix_aspect=True)
    config.train = train_section(
        steps=2000,
        warmup_steps=20,
        batch_size=4,
        secondary_batch_size=8,
        secondary_ratio=0.2,
        lr=5e-5,
        min_lr=1e-6,
        denoiser_lr=1e-4,
        denoiser_min_lr=1e-6,
        noise_std=0.5,
        cond_noise_level=True,
        drop_label=0.1,
        drop_image=0.25,
        grad_clip=1.0,
        grad_skip=True,
        remat="full",
        log_every=50,
        eval_every=500,
        checkpoint_every=500,
    )
    config.mesh = mesh_section(data=1, fsdp=-1)
    config.eval = eval_section()
    config.sample = sample_section(num=2, per_class=1, cfg=2.5)
    return config
