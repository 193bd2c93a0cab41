"""A tiny class-conditional STARFlow that trains on a laptop CPU in minutes.

8x8 single-channel images (scikit-learn's digits), 10 classes as one-hot labels
(txt_size 1, txt_dim 11: the reference's label embedding has num_classes + 1
rows), two shallow blocks and a deep block.
"""
from starflow_jax.config import model_section
import ml_collections


def get_config():
    config = ml_collections.ConfigDict()
    config.name = "tiny_cpu"
    config.model = model_section(
        in_channels=1, img_size=8, patch_size=2, channels=64, num_blocks=3, layers_per_block=(1, 1, 2),
        head_dim=32, rope=True, sos=True, txt_size=1, txt_dim=11, cond_top_only=True, use_softplus=True,
        use_final_norm=True, soft_clip=4.0, seq_order="L2R")
    return config
