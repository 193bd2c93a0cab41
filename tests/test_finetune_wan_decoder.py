"""``starflow-jax finetune-decoder`` with the Wan video VAE, end to end on a tiny random
diffusers ``AutoencoderKLWan`` (built here, nothing downloaded), perceptual term off: a few
steps on moving-digits clips; the written ``WORKDIR/vae`` is a diffusers AutoencoderKLWan
that diffusers loads and decodes like ours (1e-5), with the encoder untouched; ``sample
--vae`` decodes a video model's latents with it; a directory of neither VAE class, and clip
settings the VAE cannot take, are refused with clear errors."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="building the test VAE needs torch")
diffusers = pytest.importorskip("diffusers", reason="building the test VAE needs diffusers")

from starflow_jax.autoencoders.loading import load_autoencoder  # noqa: E402
from starflow_jax.cli.finetune_decoder import load_finetune_config, training_data  # noqa: E402
from starflow_jax.cli.main import main  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "finetune_decoder_wan_tiny.py")
VIDEO_TINY = str(ROOT / "configs" / "video_tiny_cpu.py")
WAN21 = dict(
    base_dim=8,
    z_dim=4,
    dim_mult=[1, 2, 2, 2],
    num_res_blocks=1,
    temperal_downsample=[False, True, True],
    latents_mean=[0.1, -0.2, 0.0, 0.3],
    latents_std=[1.5, 0.8, 1.0, 2.0],
)
SETS = [
    "finetune.steps=4",
    "finetune.batch_size=2",
    "finetune.image_size=16",
    "finetune.frames=5",
    "finetune.log_every=2",
    "finetune.heldout_images=4",
    "finetune.checkpoint_every=4",
]
RUN = ["--no-perceptual", *[a for s in SETS for a in ("--set", s)]]


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("wan") / "vae"
    torch.manual_seed(0)
    diffusers.AutoencoderKLWan(**WAN21).eval().save_pretrained(str(path))
    return path


def _args(vae, workdir, *extra):
    return ["finetune-decoder", "--vae", str(vae), "--config", CONFIG, "--workdir", str(workdir), *extra]


@pytest.fixture(scope="module")
def run_dir(wan_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("ft") / "w"
    assert main(_args(wan_dir, work, *RUN)) == 0
    return work


def test_wan_finetune_writes_a_diffusers_wan_vae(wan_dir, run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 2, 4]
    for key in ("reconstruction_loss", "wavelet_loss", "discriminator_loss", "psnr", "heldout_noisy_mse"):
        assert np.isfinite(rows[-1][key]), key
    assert rows[-1]["wavelet_loss"] > 0  # 5-frame clips: the wavelet term is on
    assert rows[-1]["heldout_noisy_mse"] < rows[0]["heldout_noisy_mse"], rows

    out = run_dir / "vae"
    assert json.loads((out / "config.json").read_text())["_class_name"] == "AutoencoderKLWan"
    ae = load_autoencoder(str(out))
    assert ae.kind == "video"
    theirs = diffusers.AutoencoderKLWan.from_pretrained(str(out)).eval()
    # the sampling path's decode (normalised latents, frame by frame) against diffusers' decode
    z = np.random.default_rng(0).normal(size=(1, 3, 4, 2, 2)).astype(np.float32)  # (b, t, c, h, w)
    got = ae.decode(z)
    mean = np.array(WAN21["latents_mean"], np.float32)[None, :, None, None, None]
    std = np.array(WAN21["latents_std"], np.float32)[None, :, None, None, None]
    raw = z.transpose(0, 2, 1, 3, 4) * std + mean  # diffusers: (b, c, t, h, w), unnormalised
    with torch.no_grad():
        want = theirs.decode(torch.from_numpy(raw)).sample.numpy().transpose(0, 2, 1, 3, 4)
    assert got.shape == want.shape == (1, 9, 3, 16, 16)
    assert float(np.abs(want).std()) > 0.01
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)

    # the encoder and quant_conv are the input's, exactly; the decoder was trained
    before = diffusers.AutoencoderKLWan.from_pretrained(str(wan_dir)).state_dict()
    after = theirs.state_dict()
    assert sorted(before) == sorted(after)
    for k in before:
        if k.startswith(("encoder.", "quant_conv.")):
            assert torch.equal(before[k], after[k]), k
    assert not torch.equal(before["decoder.conv_out.weight"], after["decoder.conv_out.weight"])
    assert not torch.equal(before["post_quant_conv.weight"], after["post_quant_conv.weight"])


def test_sample_decodes_a_video_model_with_the_finetuned_wan_vae(wan_dir, run_dir, tmp_path):
    model = ["--set", "model.in_channels=4", "--set", "model.img_size=4", "--set", "model.patch_size=1"]
    outs = {}
    for name, vae in (("tuned", run_dir / "vae"), ("input", wan_dir)):
        npy = tmp_path / f"{name}.npy"
        args = ["sample", "--config", VIDEO_TINY, "--random-init", *model, "--labels", "1", "--num", "1"]
        args += ["--num-frames", "2", "--vae", str(vae), "--no-denoise", "--seed", "0"]
        args += ["--out", str(tmp_path / f"{name}.gif"), "--save-npy", str(npy)]
        assert main(args) == 0
        outs[name] = np.load(npy)
    # 2 latent frames of 4x4 -> 1 + 4 = 5 frames of 32x32 RGB, decoded by the fine-tuned decoder
    assert outs["tuned"].shape == (1, 5, 3, 32, 32) and np.all(np.abs(outs["tuned"]) <= 1.0)
    assert not np.allclose(outs["tuned"], outs["input"], atol=1e-3)


def test_clear_errors(wan_dir, tmp_path, capsys):
    other = tmp_path / "unet"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    assert main(_args(other, tmp_path / "a", "--no-perceptual")) != 0
    err = capsys.readouterr().err
    assert "UNet2DModel" in err and "AutoencoderKL (SD-VAE) or AutoencoderKLWan" in err
    assert main(_args(tmp_path / "empty_nothing", tmp_path / "b", "--no-perceptual")) != 0
    assert "does not exist" in capsys.readouterr().err
    assert main(_args(wan_dir, tmp_path / "c", "--no-perceptual", "--set", "finetune.frames=4")) != 0
    assert "1 + 4k frames" in capsys.readouterr().err
    assert main(_args(wan_dir, tmp_path / "d", "--no-perceptual", "--set", "finetune.image_size=12")) != 0
    assert "not a multiple of the VAE's factor 8" in capsys.readouterr().err
    torch.manual_seed(0)
    sd = tmp_path / "sd"
    diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, sample_size=8).save_pretrained(sd)
    assert main(_args(sd, tmp_path / "e", "--no-perceptual", "--set", "finetune.image_size=8")) != 0
    assert "apply to a Wan video VAE" in capsys.readouterr().err
    three_d = ["--set", "decoder_loss.discriminator_3d=True"]
    assert main(_args(wan_dir, tmp_path / "f", "--no-perceptual", *three_d, "--set", "finetune.frames=1")) != 0
    assert "discriminator_3d scores whole clips" in capsys.readouterr().err
    assert not any((tmp_path / w).exists() for w in "abcdef")  # nothing written for a refused run


def test_clip_data_shapes(tmp_path):
    f = load_finetune_config(CONFIG, ["finetune.image_size=16", "finetune.heldout_images=3"]).finetune
    n, get, held = training_data(f, video=True)
    assert n == 1500 and held.shape == (3, 5, 3, 16, 16) and get(np.array([0, 7])).shape == (2, 5, 3, 16, 16)
    assert -1 <= held.min() and held.max() <= 1
    assert not np.array_equal(held[:, 0], held[:, 1])  # the digits move
    f = load_finetune_config(CONFIG, ["finetune.image_size=16", "finetune.frames=1"]).finetune
    n, get, held = training_data(f, video=True)  # one-frame clips: the digits as images
    assert get(np.array([0])).shape == (1, 1, 3, 16, 16) and held.shape == (16, 1, 3, 16, 16)


def test_video_folder_clips(tmp_path):
    from starflow_jax.sampling.visualize import save_mp4

    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        save_mp4(tmp_path / f"{name}.mp4", [rng.integers(0, 255, (24, 20, 3), dtype=np.uint8) for _ in range(8)])
        (tmp_path / f"{name}.txt").write_text("noise")
    sets = [f"finetune.videos={tmp_path}", "finetune.image_size=16", "finetune.heldout_images=1"]
    f = load_finetune_config(CONFIG, sets).finetune
    n, get, held = training_data(f, video=True)
    assert n == 2 and held.shape == (1, 5, 3, 16, 16) and get(np.array([1, 0])).shape == (2, 5, 3, 16, 16)
    assert -1 <= held.min() and held.max() <= 1
    f = load_finetune_config(CONFIG, [*sets, "finetune.heldout_images=3"]).finetune
    with pytest.raises(ValueError, match="holds 3 videos"):
        training_data(f, video=True)


def test_3d_discriminator_step(wan_dir):
    """``decoder_loss.discriminator_3d`` (the reference's --use_3d_disc 1): clips scored whole."""
    import jax

    from starflow_jax.autoencoders.finetune.trainer import Finetuner

    config = load_finetune_config(CONFIG, ["decoder_loss.discriminator_3d=True", "finetune.batch_size=1"])
    tuner = Finetuner(load_autoencoder(str(wan_dir)).model, config.finetune, config.decoder_loss, steps_per_epoch=5)
    assert "ClipDiscriminator" in str(tuner.program.spec.disc_graphdef)
    clips = np.random.default_rng(0).uniform(-1, 1, (1, 5, 3, 16, 16)).astype(np.float32)
    state, metrics = tuner.step(tuner.init(), clips)
    metrics = jax.device_get(metrics)
    assert np.isfinite(float(metrics["discriminator_loss"])) and float(metrics["wavelet_loss"]) > 0
    assert int(state.step) == 1


@pytest.mark.slow  # ~60 s on a 2-core CPU: two more runs, each compiling the step
def test_wan_stopped_and_resumed_equals_uninterrupted(wan_dir, run_dir, tmp_path, capsys):
    from safetensors.numpy import load_file

    work = tmp_path / "w"
    assert main(_args(wan_dir, work, *RUN, "--stop-at", "2")) == 0
    assert "stopped after step 2" in capsys.readouterr().out
    assert main(_args(wan_dir, work, *RUN)) == 0
    assert "resumed from step 2" in capsys.readouterr().out
    name = "diffusion_pytorch_model.safetensors"
    want, got = load_file(run_dir / "vae" / name), load_file(work / "vae" / name)
    assert sorted(want) == sorted(got)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
