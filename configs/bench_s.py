"""A small text-conditioned model for sampling benchmarks on a CPU: 16x16x4 latents,
patch 1 (256 tokens), width 256, 4 blocks with [1, 1, 1, 6] layers, text (8 x 32) read
by the deep block only; batch 8."""

import ml_collections

from starflow_jax.config import model_section


def get_config():
    config = ml_collections.ConfigDict()
    config.name = "bench_s"
    config.model = model_section(
        in_channels=4,
        img_size=16,
        patch_size=1,
        channels=256,
        num_blocks=4,
        layers_per_block=(1, 1, 1, 6),
        head_dim=64,
        rope=True,
        sos=True,
        txt_size=8,
        txt_dim=32,
        cond_top_only=True,
        use_softplus=True,
        use_final_norm=True,
        soft_clip=4.0,
        seq_order="L2R",
    )
    config.bench = ml_collections.ConfigDict(
        dict(
            batch=8,
            guidance=2.0,
            jacobi_block_size=16,
            jacobi_th=1e-3,
            jacobi_max_iter=32,
            tight_jacobi_th=1e-6,
            repeats=5,
            seed=0,
            # Random weights: default init, then the output projections drawn with this std so that
            # every block is a non-trivial transform (zero-initialised outputs make the flow the identity).
            proj_out_std=0.02,
        )
    )
    return config
