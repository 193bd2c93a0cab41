"""``starflow-jax finetune-decoder`` end to end on a tiny random SD-VAE (a diffusers
directory built here, nothing downloaded), perceptual term off: a short run lowers the
held-out noisy-latent reconstruction error below the frozen decoder's, and the written
``WORKDIR/vae`` loads in diffusers and decodes like ours (1e-5)."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="building the test VAE needs torch")
diffusers = pytest.importorskip("diffusers", reason="building the test VAE needs diffusers")

from flax import nnx  # noqa: E402

from starflow_jax.autoencoders.loading import load_autoencoder  # noqa: E402
from starflow_jax.cli.finetune_decoder import batch_indices, training_data  # noqa: E402
from starflow_jax.cli.main import main  # noqa: E402

CONFIG = "configs/finetune_decoder_digits.py"
SMALL = dict(
    block_out_channels=(32, 64),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=16,
)


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vae") / "tiny"
    diffusers.AutoencoderKL(**SMALL).save_pretrained(path)
    return path


def _args(vae_dir, workdir, *extra):
    return ["finetune-decoder", "--vae", str(vae_dir), "--config", CONFIG, "--workdir", str(workdir), *extra]


SETS = ["finetune.steps=20", "finetune.image_size=16", "finetune.log_every=10", "finetune.heldout_images=16"]
RUN = ["--no-perceptual", *[a for s in SETS for a in ("--set", s)]]


@pytest.fixture(scope="module")
def full_run(vae_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("full") / "w"
    assert main(_args(vae_dir, work, *RUN)) == 0
    return work


def test_finetune_lowers_heldout_error_and_exports(vae_dir, full_run, capsys):
    work = full_run
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 10, 20]
    assert rows[0]["frozen_decoder"] is True
    assert any((work / "tensorboard").iterdir())
    for key in ("reconstruction_loss", "discriminator_loss", "lecam_loss", "gan_loss", "psnr", "heldout_noisy_mse"):
        assert np.isfinite(rows[-1][key]), key
    assert rows[-1]["heldout_noisy_mse"] < 0.8 * rows[0]["heldout_noisy_mse"], rows

    ours = load_autoencoder(str(work / "vae")).model
    theirs = diffusers.AutoencoderKL.from_pretrained(work / "vae").eval()
    z = np.random.default_rng(0).normal(size=(2, 4, 8, 8)).astype(np.float32)
    with torch.no_grad():
        want = theirs.decode(torch.from_numpy(z)).sample.numpy()
    got = np.asarray(nnx.jit(lambda m, z: m.decode(z))(ours, z))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)

    # the encoder was not trained: its weights are the input directory's
    before = load_autoencoder(str(vae_dir)).model
    np.testing.assert_array_equal(
        np.asarray(before.encoder.conv_in.kernel[...]), np.asarray(ours.encoder.conv_in.kernel[...])
    )
    assert not np.array_equal(
        np.asarray(before.decoder.conv_out.kernel[...]), np.asarray(ours.decoder.conv_out.kernel[...])
    )


def test_stopped_and_resumed_equals_uninterrupted(vae_dir, full_run, tmp_path, capsys):
    from safetensors.numpy import load_file

    work = tmp_path / "w"
    assert main(_args(vae_dir, work, *RUN, "--stop-at", "10")) == 0
    assert "stopped after step 10" in capsys.readouterr().out
    assert not (work / "vae").exists()
    assert sorted(p.name for p in (work / "checkpoints").iterdir() if p.name.isdigit()) == ["10"]
    assert main(_args(vae_dir, work, *RUN, "--set", "finetune.lr=0.01")) != 0  # another config: refused
    assert "finetune.lr" in capsys.readouterr().err
    saved = json.loads((work / "finetune_config.json").read_text())  # as written before frames / videos existed
    del saved["finetune"]["frames"], saved["finetune"]["videos"], saved["decoder_loss"]["discriminator_3d"]
    (work / "finetune_config.json").write_text(json.dumps(saved))
    with open(work / "metrics.jsonl", "a") as fh:  # a row a killed run logged after its checkpoint
        fh.write(json.dumps({"step": 15, "heldout_noisy_mse": 1.0}) + "\n")
    # keys added since count at their defaults; the mesh may differ (orbax reshards the state)
    assert main(_args(vae_dir, work, *RUN, "--set", "mesh.data=1")) == 0
    assert "resumed from step 10 of" in (out := capsys.readouterr().out) and "dropped 1 metrics rows" in out, out
    name = "diffusion_pytorch_model.safetensors"
    want, got = load_file(full_run / "vae" / name), load_file(work / "vae" / name)
    assert sorted(want) == sorted(got)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    rows = lambda w: [json.loads(line) for line in (w / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert [r["step"] for r in rows(work)] == [0, 10, 20]
    strip = lambda r: {k: v for k, v in r.items() if k != "seconds"}  # noqa: E731
    assert strip(rows(work)[-1]) == strip(rows(full_run)[-1])
    assert main(_args(vae_dir, work, *RUN)) != 0  # finished: not run again
    assert "finished run" in capsys.readouterr().err


def test_clear_errors(vae_dir, tmp_path, capsys):
    assert main(_args(vae_dir, tmp_path / "a")) != 0  # perceptual on, no weight files
    assert "--lpips-vgg, --lpips-heads, --convnext" in capsys.readouterr().err
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "mine.txt").write_text("x")
    assert main(_args(vae_dir, tmp_path / "b", "--no-perceptual")) != 0
    assert "not overwriting" in capsys.readouterr().err
    assert main(_args(vae_dir, tmp_path / "c", "--no-perceptual", "--set", "finetune.nope=1")) != 0
    assert "nope" in capsys.readouterr().err


def test_batches_depend_on_the_step_alone():
    a = [batch_indices(20, s, 4, 7) for s in range(10)]
    assert all(np.array_equal(x, batch_indices(20, s, 4, 7)) for s, x in enumerate(a))
    assert sorted(np.concatenate(a[:5])) == list(range(20))  # one epoch: each image once


def test_image_folder_data(tmp_path):
    from PIL import Image

    from starflow_jax.cli.finetune_decoder import load_finetune_config

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(tmp_path / c / f"{i}.png")
    sets = [f"finetune.images={tmp_path}", "finetune.image_size=16", "finetune.heldout_images=2"]
    f = load_finetune_config(CONFIG, sets).finetune
    n, get, held = training_data(f)
    assert n == 4 and held.shape == (2, 3, 16, 16) and get(np.array([0, 3])).shape == (2, 3, 16, 16)
    assert -1 <= held.min() and held.max() <= 1
    f = load_finetune_config(CONFIG, [*sets, "finetune.heldout_images=6"]).finetune
    with pytest.raises(ValueError, match="holds 6 images"):
        training_data(f)


@pytest.mark.slow  # ~50 s on a loaded 2-core machine: VGG16's gradient compiled
def test_perceptual_term_enters_the_step(vae_dir):
    """With (random) LPIPS and a tiny ConvNeXt the generator's perceptual term is computed."""
    import jax

    from starflow_jax.autoencoders.finetune.convnext import ConvNeXt
    from starflow_jax.autoencoders.finetune.lpips import LPIPS
    from starflow_jax.autoencoders.finetune.trainer import Finetuner
    from starflow_jax.cli.finetune_decoder import load_finetune_config

    config = load_finetune_config(CONFIG, ["finetune.batch_size=2", "finetune.image_size=16"])
    tiny = ConvNeXt(depths=(1, 1), widths=(8, 16), num_classes=10, rngs=nnx.Rngs(0))
    tuner = Finetuner(
        load_autoencoder(str(vae_dir)).model,
        config.finetune,
        config.decoder_loss,
        steps_per_epoch=10,
        lpips=LPIPS(rngs=nnx.Rngs(0)),
        convnext=tiny,
    )
    images = np.random.default_rng(0).uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
    _, metrics = tuner.step(tuner.init(), images)
    metrics = jax.device_get(metrics)
    assert float(metrics["perceptual_loss"]) > 0 and np.isfinite(float(metrics["total_loss"]))


def _pixel_shards(tmp_path, keep_pixels: bool, n: int = 12, size: int = 16):
    """A tiny ``precompute`` shard set of random pictures (stand-in encoders: no VAE or T5)."""
    from PIL import Image

    from starflow_jax.data.precompute import precompute

    rng = np.random.default_rng(0)
    (tmp_path / "pics").mkdir(exist_ok=True)
    pairs = []
    for i in range(n):
        path = tmp_path / "pics" / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
        pairs.append((path, f"picture {i}"))
    out = tmp_path / ("pixels" if keep_pixels else "latents")
    precompute(
        pairs,
        out,
        encode_images=lambda x: np.zeros((len(x), 4, size // 2, size // 2), np.float32),
        encode_texts=lambda c: np.zeros((len(c), 2, 8), np.float32),
        image_size=size,
        records_per_shard=5,
        keep_pixels=keep_pixels,
        log=lambda *a: None,
    )
    return out, pairs


def test_finetune_from_precomputed_shards(vae_dir, tmp_path, capsys):
    from starflow_jax.cli.finetune_decoder import load_finetune_config
    from starflow_jax.data.image_folder import load_image

    shards, pairs = _pixel_shards(tmp_path, keep_pixels=True)
    sets = [f"finetune.shards={shards}", "finetune.image_size=16", "finetune.heldout_images=4"]
    n, get, held = training_data(load_finetune_config(CONFIG, sets).finetune)
    assert n == 8 and held.shape == (4, 3, 16, 16)
    perm = np.random.default_rng(0).permutation(12)  # the records' held-out / training split
    np.testing.assert_allclose(get(np.array([1]))[0], load_image(pairs[perm[5]][0], 16), atol=1e-6)
    np.testing.assert_allclose(held[0], load_image(pairs[perm[0]][0], 16), atol=1e-6)  # pixels kept exactly

    run = ["--no-perceptual", *[a for s in [*sets, "finetune.steps=2", "finetune.batch_size=4"] for a in ("--set", s)]]
    assert main(_args(vae_dir, tmp_path / "w", *run)) == 0
    rows = [json.loads(line) for line in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 2] and np.isfinite(rows[-1]["heldout_noisy_mse"])
    assert (tmp_path / "w" / "vae").is_dir()

    latents_only, _ = _pixel_shards(tmp_path, keep_pixels=False)
    run = ["--no-perceptual", "--set", f"finetune.shards={latents_only}", "--set", "finetune.image_size=16"]
    assert main(_args(vae_dir, tmp_path / "w2", *run)) != 0
    assert "--keep-pixels" in capsys.readouterr().err
    f = load_finetune_config(CONFIG, [f"finetune.shards={shards}", "finetune.image_size=32"]).finetune
    with pytest.raises(ValueError, match="16x16 pixels"):
        training_data(f)


def test_video_shards_keep_their_clips(tmp_path):
    from starflow_jax.cli.finetune_decoder import load_finetune_config
    from starflow_jax.data.precompute import pixels_from_uint8, pixels_to_uint8, precompute_videos

    rng = np.random.default_rng(0)
    clips = [pixels_from_uint8(rng.integers(0, 256, (5, 3, 16, 16), dtype=np.uint8)) for _ in range(6)]
    source = [dict(video=c, caption=f"clip {i}", fps=8.0) for i, c in enumerate(clips)]
    out = tmp_path / "clips"
    precompute_videos(
        source,
        out,
        encode_video=lambda v: np.zeros((2, 4, 2, 2), np.float32),
        encode_texts=lambda c: np.zeros((len(c), 2, 8), np.float32),
        records_per_shard=4,
        keep_pixels=True,
        log=lambda *a: None,
    )
    sets = [f"finetune.shards={out}", "finetune.image_size=16", "finetune.heldout_images=2"]
    f = load_finetune_config(CONFIG, [*sets, "finetune.frames=5"]).finetune
    n, get, held = training_data(f, video=True)
    perm = np.random.default_rng(0).permutation(6)
    assert n == 4 and held.shape == (2, 5, 3, 16, 16)
    np.testing.assert_array_equal(pixels_to_uint8(get(np.array([0]))[0]), pixels_to_uint8(clips[perm[2]]))
    with pytest.raises(ValueError, match="set finetune.frames=5"):
        training_data(load_finetune_config(CONFIG, sets).finetune, video=True)
    with pytest.raises(ValueError, match="Wan video VAE"):
        training_data(f)
