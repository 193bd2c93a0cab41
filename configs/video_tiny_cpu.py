"""The video main job: a tiny STARFlow-V conditioned on the digit and its motion, trained on
moving digits (scikit-learn's 8x8 digits drifting one pixel per frame with wrap-around, 8
velocities, 4-frame clips) on a laptop CPU in minutes, then sampled beyond its training length:

    starflow-jax train --config configs/video_tiny_cpu.py --workdir /tmp/video_job
    starflow-jax sample --workdir /tmp/video_job --labels 0,11,22,33 --num 4 \\
        --target-length 12 --out long.mp4

Labels are digit + 10 x velocity index (data.motion_labels; velocity k of
data.moving_digits.VELOCITIES: (-1,-1) (-1,0) (-1,1) (0,-1) (0,1) (1,-1) (1,0) (1,1), rows and
columns per frame), so label 23 is a 3 moving up and right; txt_dim 81 with the null label.

Expect held-out ~1.12 bits/dim after the 4,500 steps (about 9 min on a 2-core CPU): frame 1
~2.90, the later frames ~0.53 (the image main job: 2.15); motion score of the rounded preview
clips ~0.017 (real clips 0, frames shuffled across clips 0.34); `eval`'s unrounded samples ~0.03
against 0.0196 for real clips dequantised as trained (what an exact model reaches).

Frames of 8x8 single-channel pixels (patch 2: 16 tokens per frame), 17 grey levels with
uniform dequantisation, one-hot labels (txt_size 1); frame-local shallow blocks and a
time-causal deep block of 3 layers (the STARFlow-V layout), so the deep block's attention
window can slide over longer videos. Recipe of issue 22 (docs/performance.md, "The video main
job per frame"): 64 training clips per digit, each its own velocity and offset
(data.clip_variants); the velocity in the label (without it the flow must choose one of 8
velocities in the first tokens of frame 2, which its per-token affine steps cannot do: the
samples then blend motions); spatial RoPE on a torus (model.rope_wrap: the digits wrap around)
with keys at their token's position (model.rope_content_keys), so a frame-to-frame copy is one
attention offset; 8 heads of 32; a high peak learning rate (8e-3, clipped gradients); batches
of 16 (more updates per CPU second than 64). The two RoPE options are ours: the reference's
Model lacks them, so this model is not exported to it (`bench train --quality` trains the
reference's nearest model beside it).
"""

import ml_collections

from starflow_jax.config import data_section, eval_section, mesh_section, model_section, sample_section, train_section


def get_config():
    config = ml_collections.ConfigDict()
    config.name = "video_tiny_cpu"
    config.model = model_section(
        in_channels=1,
        img_size=8,
        patch_size=2,
        channels=64,
        num_blocks=3,
        layers_per_block=(1, 1, 3),
        head_dim=32,
        num_heads=8,
        rope=True,
        rope_wrap=True,
        rope_content_keys=True,
        sos=True,
        txt_size=1,
        txt_dim=81,
        cond_top_only=True,
        use_softplus=True,
        use_final_norm=True,
        soft_clip=4.0,
        seq_order="L2R",
        temporal_causal=1,
        shallow_block_local=True,
    )
    # each section: the defaults of starflow_jax/config/training.py, changed only where named
    config.data = data_section(name="moving_digits", num_frames=4, clip_variants=64, motion_labels=True)
    config.train = train_section(
        steps=4500, batch_size=16, lr=8e-3, warmup_steps=400, noise_type="uniform", noise_std=0.0, levels=17
    )
    config.mesh = mesh_section()
    config.eval = eval_section(num_samples=200)  # sample quality at the end (digits FD, accuracy)
    config.sample = sample_section(per_class=1)  # rows per digit, each the frames of one clip
    return config
