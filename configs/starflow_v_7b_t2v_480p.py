"""STARFlow-V 7B text-to-video at 480p: the reference's
``configs/starflow-v_7B_t2v_caus_480p.yaml`` as a training config.

Wan2.2 VAE latents (48 channels, 16x spatial, 4x temporal; latent side
640 / 16 = 40, RoPE positions normalised to 32), FLAN-T5-XL text (256 tokens,
width 2048), causal in time with per-frame shallow blocks, a 4096-wide deep
block and the learnable flow-score denoiser. 6,890,096,528 parameters (deep
block 4,842,107,024; denoiser 912,884,784), as the reference counts them.

Data: 81-frame clips at 16 fps (21 latent frames) in aspect-ratio buckets of about 640^2
pixels, and, in 20% of the steps, batches of 1536 images of about 512^2 pixels (the
reference's secondary data; the video model trains on them as images). Precompute one
folder per bucket (``--aspect-ratio``; videos sorted into buckets by their shape
beforehand), captions through the fps, noise-level and aspect-ratio templates:

    for r in 1:1 16:9 9:16; do                        # each bucket W:H present, in folder WxH
      starflow-jax precompute --videos clips_${r/:/x} --vae wan2.2-ti2v-5b:0.6 --text-encoder flan-t5-xl \\
          --out shards/${r/:/x} --image-size 640 --num-frames 81 --fps 16 --fps-cond --drop-image \\
          --noise-level-cond 0.5 --aspect-ratio $r --txt-size 256
      starflow-jax precompute --images imgs_${r/:/x} --captions captions_${r/:/x}.tsv --vae wan2.2-ti2v-5b:0.6 \\
          --text-encoder flan-t5-xl --out image_shards/${r/:/x} --image-size 512 --fps-cond \\
          --noise-level-cond 0.5 --aspect-ratio $r --txt-size 256
    done
    starflow-jax train --config configs/starflow_v_7b_t2v_480p.py --workdir workdirs/7b \\
        --set data.path=shards --set data.secondary_path=image_shards
    starflow-jax sample --workdir workdirs/7b --prompt "a red cat" --text-encoder flan-t5-xl \\
        --vae wan2.2-ti2v-5b:0.6 --cfg 2.5 --jacobi --out cat.mp4

The reference's recipe: noise_std 0.5 with the loss weighted by noise_std / 0.3
(``cond_noise_level``), batch 192 clips (secondary: 1536 images, ratio 0.2), AdamW at 5e-5
decaying to 1e-6 (the denoiser at 1e-4 to 1e-6), 10% dropped captions, 25% of the clip
batches trained without their first frame (``drop_image``), gradients clipped at 1 and
updates above it skipped (``grad_skip``), full gradient checkpointing (``remat="full"``,
its gradient_checkpoint and gradient_checkpoint_mlp), previews at guidance 2.5.
``steps`` / ``warmup_steps``: its script's defaults (1000 epochs of 50,000 clips). Its
``loss_scaling`` (fp16 gradient scaling) has no counterpart in bf16. Mesh: a v5p-256
(128 chips, 4x4x8) as FSDP 64 x tensor 2, so that 192 clips split (3 per batch shard);
check the fit with ``starflow-jax plan``. Expected result: not measured here.
"""

import ml_collections

from starflow_jax.config import data_section, eval_section, mesh_section, model_section, sample_section, train_section


def get_config():
    config = ml_collections.ConfigDict()
    config.name = "starflow_v_7b_t2v_480p"
    config.model = model_section(
        in_channels=48,
        img_size=40,
        patch_size=1,
        channels=3072,
        top_block_channels=4096,
        num_blocks=6,
        layers_per_block=(2, 2, 2, 2, 2, 24),
        head_dim=64,
        rope=True,
        pt_seq_len=32,
        sos=True,
        txt_size=256,
        txt_dim=2048,
        cond_top_only=True,
        use_softplus=True,
        use_final_norm=True,
        soft_clip=4.0,
        seq_order="L2R",
        learnable_self_denoiser=True,
        conditional_denoiser=True,
        denoiser_window=10,
        temporal_causal=2,
        shallow_block_local=True,
        dtype="bfloat16",
    )  # matmuls in bfloat16, parameters and Adam state in float32 (the reference trains
    # under bfloat16 autocast)
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
    config.data = data_section(name="array_record", vid_size="81:16", mix_aspect=True)
    config.train = train_section(
        steps=260_000,
        warmup_steps=260,
        batch_size=192,
        secondary_batch_size=1536,
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
        log_every=100,
        eval_every=10_000,
        checkpoint_every=1000,
    )
    config.mesh = mesh_section(data=1, fsdp=-1, tensor=2)
    config.eval = eval_section()
    config.sample = sample_section(num=4, per_class=1, cfg=2.5)
    return config
