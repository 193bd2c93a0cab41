"""The sampling benchmark's model (`configs/bench_s.py`: 16x16x4 latents, patch 1, 256
tokens, width 256, blocks of [1, 1, 1, 6] layers, text 8 x 32 read by the deep block)
trained on the embedded digits given as latents: each digit repeated to 16x16, its 4
channels the image rolled by a pixel each way (`data.digits.digits_at`), each class's
caption a fixed random 8 x 32 embedding. A trained checkpoint of the benchmark's shape for
measuring sampling policies (issue 18's model (c)); not a model of real latents.

    starflow-jax train --config configs/bench_s_digits.py --workdir workdirs/bench_s_digits
    starflow-jax bench jacobi --workdir workdirs/bench_s_digits --num 8

Expect held-out 0.90 bits/dim after the 400 steps (1.32 at step 200; full-covariance Gaussian
1.75): 37 min and 8 GB on a 2-core CPU shared with other jobs (0.2-0.3 steps/s).
"""

import pathlib

import ml_collections

from starflow_jax.config import data_section, eval_section, mesh_section, sample_section, train_section
from starflow_jax.config.loader import load_config


def get_config():
    config = ml_collections.ConfigDict()
    config.name = "bench_s_digits"
    config.model = load_config(pathlib.Path(__file__).with_name("bench_s.py")).model
    config.data = data_section(name="digits")
    config.train = train_section(
        steps=400, batch_size=16, warmup_steps=50, noise_type="uniform", noise_std=0.0, levels=17, eval_every=200
    )
    config.mesh = mesh_section()
    config.eval = eval_section()
    config.sample = sample_section(num=8)
    return config
