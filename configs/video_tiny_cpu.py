"""The video main job: a tiny class-conditional STARFlow-V trained on moving digits
(scikit-learn's 8x8 digits drifting with wrap-around, 4-frame clips) on a laptop CPU in
minutes, then sampled beyond its training length:

    starflow-jax train --config configs/video_tiny_cpu.py --workdir /tmp/video_job
    starflow-jax sample --workdir /tmp/video_job --labels 0,1,2,3 --num 4 \\
        --target-length 12 --out long.mp4

Frames of 8x8 single-channel pixels (patch 2: 16 tokens per frame), 17 grey levels with
uniform dequantisation, one-hot labels (txt_size 1, txt_dim 11 with the null label);
frame-local shallow blocks and a time-causal deep block (the STARFlow-V layout), so the
deep block's attention window can slide over longer videos.
"""
import ml_collections

from starflow_jax.config import model_section, train_section


def get_config():
    config = ml_collections.ConfigDict()
    config.name = "video_tiny_cpu"
    config.model = model_section(
        in_channels=1, img_size=8, patch_size=2, channels=64, num_blocks=3, layers_per_block=(1, 1, 2),
        head_dim=32, rope=True, sos=True, txt_size=1, txt_dim=11, cond_top_only=True, use_softplus=True,
        use_final_norm=True, soft_clip=4.0, seq_order="L2R", temporal_causal=1, shallow_block_local=True)
    config.data = ml_collections.ConfigDict(dict(name="moving_digits", num_train=1500, split_seed=0, num_frames=4))
    config.train = train_section(
        steps=2000, batch_size=64, lr=1e-3, min_lr=1e-5, warmup_steps=200, b1=0.9, b2=0.95,
        weight_decay=1e-4, grad_clip=1.0, grad_skip=False, noise_type="uniform", noise_std=0.0, levels=17,
        drop_label=0.1, latent_norm_regularization=0.0, ema_decay=0.0, remat="none", grad_accum=1,
        cond_noise_level=False, seed=0, drop_image=0.0,
        log_every=100, eval_every=1000, checkpoint_every=1000, keep_checkpoints=3)
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    # per_class: sample rows per digit in samples.png (each row the frames of one clip)
    config.sample = ml_collections.ConfigDict(dict(per_class=1, cfg=1.0, temperature=0.9, scale=4, every=0))
    return config
