"""A tiny text-to-image STARFlow trained on precomputed shards (``starflow-jax precompute``:
SD-VAE latents and T5 embeddings), a template for latent-space runs.

    starflow-jax precompute --images imgs --captions captions.tsv --vae sd-vae --text-encoder flan-t5 \\
        --out shards --image-size 64 --txt-size 16
    starflow-jax train --config configs/t2i_latents_tiny.py --workdir workdirs/t2i --set data.path=shards
    starflow-jax sample --workdir workdirs/t2i --prompt "a red cat" --text-encoder flan-t5 --vae sd-vae \\
        --cfg 2 --jacobi --out cat.png

``model.img_size`` is the latent side (image side / 8 for the SD-VAE), ``model.txt_dim``
the text encoder's width (2048 for flan-t5-xl), ``model.txt_size`` precompute's
``--txt-size``.
"""

import ml_collections

from starflow_jax.config import data_section, eval_section, mesh_section, model_section, sample_section, train_section


def get_config():
    config = ml_collections.ConfigDict()
    config.name = "t2i_latents_tiny"
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
    )
    # each section: the defaults of starflow_jax/config/training.py, changed only where named
    config.data = data_section(name="array_record")  # set data.path (and data.heldout_path)
    config.train = train_section(steps=2000, batch_size=32, lr=5e-4, log_every=50, eval_every=500, checkpoint_every=500)
    config.mesh = mesh_section()
    config.eval = eval_section()
    config.sample = sample_section(num=8, per_class=1, cfg=2.0, temperature=1.0)
    return config
