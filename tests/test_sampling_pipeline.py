"""The one sampling pipeline: ``starflow-jax sample`` and the training previews go through
``sampling.pipeline.generate``, and both take the training noise out of their samples."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fast_run import FAST, TINY
from flax import nnx
from PIL import Image

from starflow_jax.cli.main import main
from starflow_jax.config import load_config, model_config
from starflow_jax.data.sources import make_data
from starflow_jax.flow.labels import one_hot_labels
from starflow_jax.flow.noise import add_noise, quantize
from starflow_jax.model import StarFlow
from starflow_jax.sampling import SamplingOptions
from starflow_jax.sampling.pipeline import Conditioning, TrainingNoise, generate
from starflow_jax.train.loop import sample_grid

LEVELS = 17  # configs/tiny_cpu.py: digits with 17 grey levels, uniform dequantisation


def _on_levels(x: np.ndarray, levels: int = LEVELS) -> np.ndarray:
    """Whether each value of ``x`` (in [-1, 1]) is one of the ``levels`` data values."""
    k = (x + 1.0) / 2.0 * (levels - 1)
    return np.abs(k - np.round(k)) < 1e-5


@pytest.mark.parametrize("levels", [17, 256])
def test_quantize_inverts_uniform_dequantisation(levels):
    k = jax.random.randint(jax.random.key(0), (4, 1, 8, 8), 0, levels)
    x = k / (levels - 1) * 2.0 - 1.0
    noisy = add_noise(jax.random.key(1), x, 0.0, "uniform", levels)
    assert not np.all(_on_levels(np.asarray(noisy), levels))
    np.testing.assert_allclose(np.asarray(quantize(noisy, levels)), np.asarray(x), atol=1e-6)
    # out-of-range values go to the end levels
    np.testing.assert_array_equal(np.asarray(quantize(jnp.array([-3.0, 3.0]), levels)), [-1.0, 1.0])


def _preview(tmp_path, denoise: bool):
    config = load_config(TINY, FAST + [f"sample.denoise={denoise}"])
    model = StarFlow(model_config(config), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    path = tmp_path / f"preview_{denoise}.png"
    sample_grid(config, graphdef, params, path, make_data(config), seed=5)
    return config, model, np.asarray(Image.open(path))


def test_preview_is_the_pipeline_and_is_denoised(tmp_path):
    config, model, png = _preview(tmp_path, denoise=True)
    assert png.shape == (9 + 1, 10 * 9 + 1)  # one row (sample.per_class=1), one column per class
    # recomputed through the pipeline with the settings config.sample names
    labels = jnp.arange(10)
    x = generate(
        model,
        (10, 1, 8, 8),
        5,
        Conditioning(one_hot_labels(labels, 10), one_hot_labels(-jnp.ones_like(labels), 10)),
        SamplingOptions(guidance=1.0, jacobi=True, jacobi_block_size=64, jacobi_th=1e-5, jacobi_max_iter=64),
        temperature=0.9,
        noise=TrainingNoise("uniform", 0.0, LEVELS),
        quantize_samples=True,
    ).x
    assert np.all(_on_levels(x))
    cells = np.stack([png[1:9, 1 + 9 * i : 9 + 9 * i] for i in range(10)])
    np.testing.assert_array_equal(cells, np.round((np.clip(x[:, 0], -1, 1) + 1) * 127.5).astype(np.uint8))
    # every pixel of the picture is a grey level of the data (or the grid's black padding)
    allowed = set(np.round(np.arange(LEVELS) / (LEVELS - 1) * 255).astype(int)) | {0}
    assert set(np.unique(png).tolist()) <= allowed
    # without denoising the samples keep their dequantisation noise
    _, _, noisy = _preview(tmp_path, denoise=False)
    assert not set(np.unique(noisy).tolist()) <= allowed


@pytest.mark.parametrize("quantize", [True, False])
def test_sample_cli_is_the_pipeline(tmp_path, quantize):
    npy = tmp_path / "x.npy"
    args = ["sample", "--config", str(TINY), "--set", "model.channels=32", "--random-init", "--labels", "1,7"]
    args += ["--num", "4", "--seed", "2", "--cfg", "1.5", "--out", str(tmp_path / "x.png"), "--save-npy", str(npy)]
    assert main(args + (["--quantize"] if quantize else [])) == 0
    config = load_config(TINY, ["model.channels=32"])
    model = StarFlow(model_config(config), rngs=nnx.Rngs(2))
    labels = jnp.array([1, 7, 1, 7])
    want = generate(
        model,
        (4, 1, 8, 8),
        2,
        Conditioning(one_hot_labels(labels, 10), one_hot_labels(-jnp.ones_like(labels), 10)),
        SamplingOptions(guidance=1.5),
        noise=TrainingNoise.from_config(config),
        quantize_samples=quantize,
    ).x
    got = np.load(npy)
    np.testing.assert_array_equal(got, want)
    assert np.all(_on_levels(got)) == quantize
