"""The main job: a tiny class-conditional STARFlow trained on scikit-learn's digits on a
laptop CPU in minutes.

8x8 single-channel images with 17 grey levels (uniform dequantisation), 10 classes as
one-hot labels (txt_size 1, txt_dim 11: the reference's label embedding has
num_classes + 1 rows, the last one the null label used for guidance), two shallow
blocks and a deep block.
"""
import ml_collections

from starflow_jax.config import model_section, train_section


def get_config():
    config = ml_collections.ConfigDict()
    config.name = "tiny_cpu"
    config.model = model_section(
        in_channels=1, img_size=8, patch_size=2, channels=64, num_blocks=3, layers_per_block=(1, 1, 2),
        head_dim=32, rope=True, sos=True, txt_size=1, txt_dim=11, cond_top_only=True, use_softplus=True,
        use_final_norm=True, soft_clip=4.0, seq_order="L2R")
    config.data = ml_collections.ConfigDict(dict(name="digits", num_train=1500, split_seed=0))
    config.train = train_section(
        steps=3000, batch_size=128, lr=1e-3, min_lr=1e-5, warmup_steps=200, b1=0.9, b2=0.95,
        weight_decay=1e-4, grad_clip=1.0, grad_skip=False, noise_type="uniform", noise_std=0.0, levels=17,
        drop_label=0.1, latent_norm_regularization=0.0, ema_decay=0.0, remat="none", grad_accum=1,
        cond_noise_level=False, seed=0,
        log_every=100, eval_every=1000, checkpoint_every=1000, keep_checkpoints=3)
    # Device mesh: all devices on the data axis by default (-1: the remaining devices).
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    # every: also write samples_<step>.png every N steps (0: only samples.png at the end)
    config.sample = ml_collections.ConfigDict(dict(per_class=4, cfg=1.0, temperature=0.9, scale=4, every=0))
    return config
