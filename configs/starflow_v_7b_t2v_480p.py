"""STARFlow-V 7B text-to-video at 480p: the reference's
``configs/starflow-v_7B_t2v_caus_480p.yaml`` as an ml-collections config.

Wan2.2 VAE latents (48 channels, 16x spatial, 4x temporal; latent side
640 / 16 = 40, RoPE positions normalised to 32), FLAN-T5-XL text (256 tokens,
width 2048), causal in time with per-frame shallow blocks, a 4096-wide deep
block and the learnable flow-score denoiser. 6,890,096,528 parameters (deep
block 4,842,107,024; denoiser 912,884,784), as the reference counts them.
"""
import ml_collections

from starflow_jax.config import model_section


def get_config():
    config = ml_collections.ConfigDict()
    config.name = "starflow_v_7b_t2v_480p"
    config.model = model_section(
        in_channels=48, img_size=40, patch_size=1, channels=3072, top_block_channels=4096, num_blocks=6,
        layers_per_block=(2, 2, 2, 2, 2, 24), head_dim=64, rope=True, pt_seq_len=32, sos=True, txt_size=256,
        txt_dim=2048, cond_top_only=True, use_softplus=True, use_final_norm=True, soft_clip=4.0,
        seq_order="L2R", learnable_self_denoiser=True, conditional_denoiser=True, denoiser_window=10,
        temporal_causal=2, shallow_block_local=True)
    config.data = ml_collections.ConfigDict(dict(
        image_size=640, secondary_image_size=512, vid_size="81:16", fps_cond=True, mix_aspect=True,
        no_flip=True, wds=True))
    config.autoencoder = ml_collections.ConfigDict(dict(
        name="Wan-AI/Wan2.2-TI2V-5B-Diffusers", downsample_factor=16, temporal_downsample_factor=4,
        temporal_scale=0.6, finetuned="none"))
    config.text_encoder = ml_collections.ConfigDict(dict(name="google/flan-t5-xl", width=2048))
    config.train = ml_collections.ConfigDict(dict(
        noise_std=0.5, batch_size=192, secondary_batch_size=1536, secondary_ratio=0.2, lr=5e-5, min_lr=1e-6,
        cond_noise_level=True, drop_label=0.1, drop_image=0.25, cfg=2.5, loss_scaling=True, grad_clip=1.0,
        grad_skip=True, gradient_checkpoint=1, gradient_checkpoint_mlp=1, fsdp=True, fsdp_text_encoder=True,
        sample_freq=100000))
    return config
