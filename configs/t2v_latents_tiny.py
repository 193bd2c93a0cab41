"""A tiny text-to-video STARFlow-V trained on precomputed clip shards (``starflow-jax
precompute --videos``: SD-VAE latents frame by frame and T5 embeddings), a template for
video latent runs.

    starflow-jax precompute --videos clips --vae sd-vae --text-encoder flan-t5 --out shards \\
        --image-size 64 --num-frames 5 --fps 8 --fps-cond --drop-image --txt-size 16
    starflow-jax train --config configs/t2v_latents_tiny.py --workdir workdirs/t2v --set data.path=shards

Causal in time (``temporal_causal``) with per-frame shallow blocks. ``data.num_frames`` is
the latent frames per clip (frame-wise VAE: the clip's frames; a causal video VAE with
temporal factor 4: ``1 + (frames - 1) / 4``). ``train.drop_image``: the probability that a
batch is trained without its first frame, conditioned on the ``"(extend) "`` captions
(precompute ``--drop-image``).
"""

import ml_collections

from starflow_jax.config import data_section, eval_section, mesh_section, model_section, sample_section, train_section


def get_config():
    config = ml_collections.ConfigDict()
    config.name = "t2v_latents_tiny"
    config.model = model_section(
        in_channels=4,
        img_size=8,
        patch_size=1,
        channels=128,
        num_blocks=3,
        layers_per_block=(1, 1, 4),
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
        temporal_causal=1,
        shallow_block_local=True,
    )
    # each section: the defaults of starflow_jax/config/training.py, changed only where named
    config.data = data_section(name="array_record", num_frames=5)  # set data.path (and data.heldout_path)
    config.train = train_section(
        steps=2000, batch_size=16, lr=5e-4, drop_image=0.25, log_every=50, eval_every=500, checkpoint_every=500
    )
    config.mesh = mesh_section()
    config.eval = eval_section()
    config.sample = sample_section(num=4, per_class=1, cfg=2.0, temperature=1.0)
    return config
