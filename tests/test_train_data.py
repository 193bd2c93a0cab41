"""The training loop on the other inputs: an image folder (class labels) and ArrayRecord
shards of latents and text embeddings (with the learnable denoiser); metrics go to
metrics.jsonl and TensorBoard."""

import json
import pathlib

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from starflow_jax.config import data_section, load_config, model_config
from starflow_jax.data.array_record import write_shards
from starflow_jax.data.sources import make_data
from starflow_jax.model import StarFlow
from starflow_jax.sampling import SamplingOptions
from starflow_jax.sampling.pipeline import Conditioning, TrainingNoise, generate
from starflow_jax.sampling.visualize import grid, to_uint8
from starflow_jax.train.loop import evaluate, train
from starflow_jax.train.metrics_writer import read_scalars
from starflow_jax.train.program import step_settings
from starflow_jax.workdir.params import load_params

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny_cpu.py"
SHORT = [
    "train.batch_size=8",
    "train.steps=4",
    "train.warmup_steps=1",
    "train.log_every=2",
    "train.eval_every=4",
    "train.checkpoint_every=4",
    "sample.per_class=1",
    "sample.scale=1",
    "eval.num_samples=0",
]


def _graphdef(config):
    return nnx.graphdef(nnx.eval_shape(lambda: StarFlow(model_config(config), rngs=nnx.Rngs(0))))


def _config(overrides, data: dict, model: dict):
    config = load_config(TINY, SHORT + overrides)
    with config.unlocked():
        config.data = data_section(**data)
        for k, v in model.items():
            config.model[k] = v
    return config


def test_train_on_an_image_folder(tmp_path):
    rng = np.random.default_rng(0)
    for c, name in enumerate(["cat", "dog", "eel"]):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for i in range(6):
            a = np.clip(rng.normal(80 * c, 30, (12, 10, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(a).save(tmp_path / "imgs" / name / f"{i}.png")
    config = _config(
        ["model.channels=32", "model.layers_per_block=[1, 0, 1]"],
        dict(name="image_folder", root=str(tmp_path / "imgs"), heldout_fraction=0.2, split_seed=0),
        dict(in_channels=3, txt_dim=4),
    )
    result = train(config, str(tmp_path / "run"), log=lambda *a: None)
    # the reported held-out bits per dimension are those of the saved parameters on the held-out
    # images (20% of 18, rounded up)
    data = make_data(config)
    assert len(data.heldout) == 4 and len(data.train) == 14
    _, _, params = load_params(tmp_path / "run")
    bpd = evaluate(config, _graphdef(config), params, data.heldout, step_settings(config, data.num_classes))
    np.testing.assert_allclose(bpd, result["heldout_bpd"], rtol=1e-5)
    assert Image.open(tmp_path / "run" / "samples.png").size[0] == 3 * 9 + 1  # one column per class
    scalars = read_scalars(tmp_path / "run" / "tensorboard")
    assert [s for s, _ in scalars["train/loss"]] == [2, 4] and "train/heldout_bpd" in scalars
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    np.testing.assert_allclose([v for _, v in scalars["train/loss"]], [r["loss"] for r in rows], rtol=1e-6)


def test_image_folder_class_count_must_match_the_model(tmp_path):
    for name in ["a", "b"]:
        (tmp_path / "imgs" / name).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "imgs" / name / "x.png")
    config = _config([], dict(name="image_folder", root=str(tmp_path / "imgs")), {})
    with pytest.raises(ValueError, match="has 2 classes: the model needs txt_size=1 and txt_dim=3"):
        train(config, str(tmp_path / "run"), log=lambda *a: None)
    assert not (tmp_path / "run").exists()  # bad data is refused before the workdir is made


def test_train_on_latent_shards_with_the_denoiser(tmp_path):
    rng = np.random.default_rng(0)
    records = [
        dict(
            latent=rng.normal(size=(4, 8, 8)).astype(np.float32),
            text_emb=rng.normal(size=(3, 6)).astype(np.float32),
            caption=f"caption {i}",
        )
        for i in range(20)
    ]
    write_shards(tmp_path / "shards", records[:16], records_per_shard=6)
    write_shards(tmp_path / "held", records[16:])
    config = _config(
        ["model.channels=32", "model.layers_per_block=[1, 0, 1]", "train.noise_type=gaussian", "train.noise_std=0.3"],
        dict(name="array_record", path=str(tmp_path / "shards"), heldout_path=str(tmp_path / "held")),
        dict(in_channels=4, txt_size=3, txt_dim=6, learnable_self_denoiser=True),
    )
    with config.unlocked():
        config.sample.num = 2
    result = train(config, str(tmp_path / "run"), log=lambda *a: None)
    assert np.isfinite(result["heldout_bpd"])
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["denoiser_loss"]) for r in rows)
    assert "train/denoiser_loss" in read_scalars(tmp_path / "run" / "tensorboard")
    # the preview: the first two held-out captions' samples, denoised by the learned denoiser,
    # latents shown by their first three channels
    _, _, params = load_params(tmp_path / "run")
    model = nnx.merge(_graphdef(config), params)
    y = np.stack([r["text_emb"] for r in records[16:18]])
    want = generate(
        model,
        (2, 4, 8, 8),
        0,
        Conditioning(y, np.zeros_like(y)),
        SamplingOptions(guidance=1.0, jacobi=True, jacobi_block_size=16, jacobi_th=1e-5, jacobi_max_iter=64),
        temperature=0.9,
        noise=TrainingNoise("gaussian", 0.3, 256),
    ).x
    png = np.asarray(Image.open(tmp_path / "run" / "samples.png"))
    np.testing.assert_array_equal(png, grid(to_uint8(want, pixel_space=False)))


def test_latent_shards_must_match_the_model(tmp_path):
    write_shards(
        tmp_path / "shards", [dict(latent=np.zeros((4, 8, 8), np.float32), text_emb=np.zeros((2, 6), np.float32))] * 2
    )
    config = _config([], dict(name="array_record", path=str(tmp_path / "shards")), dict(in_channels=4))
    with pytest.raises(ValueError, match="text embeddings in .* have shape \\(2, 6\\), the model expects \\(1, 11\\)"):
        train(config, str(tmp_path / "run"), log=lambda *a: None)


def test_unknown_data_name(tmp_path):
    config = _config([], dict(name="imagenet"), {})
    with pytest.raises(ValueError, match="data.name='imagenet' unknown"):
        train(config, str(tmp_path / "run"), log=lambda *a: None)
