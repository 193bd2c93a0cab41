"""``starflow-jax sample``: pictures from a random tiny model and from reference weights."""

import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import reference_case
from PIL import Image

from starflow_jax.cli.main import main
from starflow_jax.interop import reference_cases as rc
from starflow_jax.sampling import SamplingOptions, sample

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny_cpu.py")


def test_sample_random_tiny_model_writes_png(tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert (
        main(
            [
                "sample",
                "--config",
                TINY,
                "--random-init",
                "--labels",
                "0,1,2,3",
                "--num",
                "4",
                "--cfg",
                "1.0",
                "--out",
                str(out),
                "--save-npy",
                str(tmp_path / "x.npy"),
            ]
        )
        == 0
    )
    img = Image.open(out)
    # 2x2 grid of 8x8 single-channel images with 1-pixel padding
    assert img.size == (2 * 9 + 1, 2 * 9 + 1) and img.mode == "L"
    x = np.load(tmp_path / "x.npy")
    assert x.shape == (4, 1, 8, 8) and np.all(np.isfinite(x))
    # the picture is those samples: cell (r, c) holds sample 2 r + c as [-1, 1] -> 0..255 grey
    png = np.asarray(img)
    for i in range(4):
        r, c = divmod(i, 2)
        cell = png[1 + 9 * r : 9 + 9 * r, 1 + 9 * c : 9 + 9 * c]
        np.testing.assert_array_equal(cell, np.round((np.clip(x[i, 0], -1, 1) + 1) * 127.5).astype(np.uint8))
    assert (png[0] == 0).all() and (png[:, 9] == 0).all()  # the padding
    assert "wrote" in capsys.readouterr().out


def test_sample_from_reference_weights_matches_the_library(tmp_path):
    from conftest import reference_case_path, write_case_config

    path = reference_case_path("t2i_small")
    case = rc.load_case(path)

    cfg_file = write_case_config(tmp_path, case)
    np.save(tmp_path / "y.npy", case.arrays["input/y"])
    out = tmp_path / "ref.png"
    assert (
        main(
            [
                "sample",
                "--config",
                str(cfg_file),
                "--weights",
                str(path),
                "--cond",
                str(tmp_path / "y.npy"),
                "--num",
                "2",
                "--seed",
                "3",
                "--jacobi",
                "--jacobi-th",
                "1e-8",
                "--out",
                str(out),
                "--save-npy",
                str(tmp_path / "x.npy"),
            ]
        )
        == 0
    )
    assert Image.open(out).size == (2 * 9 + 1, 9 + 1)
    model, _ = rc.build_model(case)
    import jax

    noise = jax.random.normal(jax.random.key(3), (2, 4, 8, 8), jnp.float32)
    expected = sample(model, noise, jnp.asarray(case.arrays["input/y"]), SamplingOptions())
    assert rc.relative_error(np.load(tmp_path / "x.npy"), np.asarray(expected)) < 1e-4


def test_sample_at_a_temperature_over_two_devices_matches_the_library(tmp_path):
    """``--temperature`` scales the prior noise; on a machine with several devices the
    samples are split over them (the model on each), with the one-device result."""
    import os
    import subprocess
    import sys

    import jax
    from conftest import reference_case_path, write_case_config

    path = reference_case_path("t2i_small")
    case = rc.load_case(path)
    cfg_file = write_case_config(tmp_path, case)
    np.save(tmp_path / "y.npy", case.arrays["input/y"])
    args = ["sample", "--config", str(cfg_file), "--weights", str(path), "--cond", str(tmp_path / "y.npy")]
    args += ["--num", "2", "--seed", "3", "--temperature", "0.5", "--out", str(tmp_path / "t.png")]
    args += ["--save-npy", str(tmp_path / "x.npy")]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    run = subprocess.run(
        [sys.executable, "-m", "starflow_jax.cli.main", *args], env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "samples split over 2 devices" in run.stderr, run.stderr[-3000:]
    model, _ = rc.build_model(case)
    noise = 0.5 * jax.random.normal(jax.random.key(3), (2, 4, 8, 8), jnp.float32)
    expected = sample(model, noise, jnp.asarray(case.arrays["input/y"]), SamplingOptions())
    assert rc.relative_error(np.load(tmp_path / "x.npy"), np.asarray(expected)) < 1e-4


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--out", "x.jpg"], "must end in .png, .gif or .mp4"),
        (["--out", "x.gif", "--labels", "1"], "written as a .png grid"),
        (["--out", "x.png", "--labels", "1", "--fps", "0"], "--fps must be > 0"),
        (["--out", "x.png"], "give exactly one of --labels, --cond or --prompt"),
        (["--out", "x.png", "--labels", "0,11"], "labels must lie in"),
        (["--out", "x.png", "--labels", "a,b"], "comma-separated integers"),
        (["--out", "x.png", "--labels", "1", "--cfg", "-1"], "--cfg must be >= 0"),
        (["--out", "x.png", "--labels", "1", "--temperature", "-1"], "--temperature must be >= 0"),
    ],
)
def test_sample_bad_arguments(extra, message, capsys, tmp_path):
    args = ["sample", "--config", TINY, "--random-init"] + extra
    args[args.index("--out") + 1] = str(tmp_path / args[args.index("--out") + 1])
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_sample_missing_weights(capsys, tmp_path):
    assert (
        main(
            [
                "sample",
                "--config",
                TINY,
                "--weights",
                str(tmp_path / "nope.pth"),
                "--labels",
                "1",
                "--out",
                str(tmp_path / "x.png"),
            ]
        )
        == 2
    )
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("suffix", [".mp4", ".gif"])
def test_sample_video_writes_frames_that_decode(tmp_path, suffix):
    """A video model's samples written as MP4 (or GIF) decode back to --num-frames frames."""
    case = reference_case("video_small")
    from conftest import write_case_config

    cfg_file = write_case_config(tmp_path, case)
    y = np.random.default_rng(0).normal(size=(2, 5, 12)).astype(np.float32)
    np.save(tmp_path / "y.npy", y)
    out = tmp_path / f"video{suffix}"
    assert (
        main(
            [
                "sample",
                "--config",
                str(cfg_file),
                "--random-init",
                "--cond",
                str(tmp_path / "y.npy"),
                "--num",
                "2",
                "--num-frames",
                "3",
                "--no-denoise",
                "--scale",
                "3",
                "--fps",
                "4",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    if suffix == ".mp4":
        from starflow_jax.sampling.visualize import read_video_frames

        frames = read_video_frames(out)
        # a 2x1 grid of 4x4 latents with 1-pixel padding (11 x 6), scaled 3x: 33 x 18, the odd
        # width padded to 34 for the codec
        assert frames.shape == (3, 18, 34, 3)
    else:
        img = Image.open(out)
        assert img.n_frames == 3 and img.size == (33, 18)


def test_sample_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "grid.png"
    out.write_bytes(b"mine")
    args = ["sample", "--config", TINY, "--random-init", "--labels", "1", "--num", "1", "--out", str(out)]
    assert main(args) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"mine"
    assert main(args + ["--overwrite"]) == 0
    assert Image.open(out).size == (10, 10)


def test_bench_sample_cli(tmp_path, capsys):
    """`bench sample` times sequential and Jacobi sampling and writes JSON rows with the
    passes and the Jacobi-vs-sequential differences."""
    import json

    out = tmp_path / "bench.json"
    assert main(["bench", "sample", "--config", TINY, "--batch", "2", "--repeats", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    keys = {
        "impl",
        "mode",
        "guidance",
        "jacobi_th",
        "batch",
        "seconds",
        "passes",
        "max_abs_diff_vs_sequential",
        "rel_rms_diff_vs_sequential",
    }
    assert all(keys <= set(r) and r["impl"] == "jax" and r["batch"] == 2 for r in rows)
    for g in (0.0, 2.0):  # tiny_cpu has no bench section: guidance 2 by default
        seq = [r for r in rows if r["mode"] == "sequential" and r["guidance"] == g]
        jac = [r for r in rows if r["mode"] == "jacobi" and r["guidance"] == g]
        assert len(seq) == 1 and len(jac) == 2 and seq[0]["rel_rms_diff_vs_sequential"] == 0.0
        assert all(r["passes"] <= seq[0]["passes"] for r in jac)
        tight = [r for r in jac if r["jacobi_th"] == 1e-6][0]
        assert tight["rel_rms_diff_vs_sequential"] < 1e-3
    # dense FLOPs: sequential inversion takes every token once through every layer (guidance
    # doubling the guided blocks' rows); Jacobi passes are chunks of jacobi_block_size tokens
    from starflow_jax.bench.flops import layer_flops
    from starflow_jax.config import load_config, model_config

    cfg = model_config(load_config(TINY))
    tokens = cfg.seq_side**2
    heads = cfg.channels // cfg.head_dim
    per_token = sum(
        n
        * layer_flops(
            1,
            cfg.channels,
            heads,
            cfg.num_kv_heads or heads,
            cfg.head_dim,
            int(cfg.channels * cfg.expansion),
            cfg.use_swiglu,
            0,
        )
        for n in cfg.layers_per_block
    )
    seq0 = [r for r in rows if r["mode"] == "sequential" and r["guidance"] == 0.0][0]
    assert seq0["dense_flops"] == pytest.approx(2 * tokens * per_token)
    assert seq0["passes_per_block"] == [tokens if n else 0 for n in reversed(cfg.layers_per_block)]
    seq2 = [r for r in rows if r["mode"] == "sequential" and r["guidance"] == 2.0][0]
    assert seq0["dense_flops"] < seq2["dense_flops"] <= 2 * seq0["dense_flops"]
    assert "sequential" in capsys.readouterr().out


VIDEO_TINY = str(ROOT / "configs" / "video_tiny_cpu.py")
EXACT = ["--set", "train.noise_type=gaussian", "--noise-std", "0"]  # given frames kept without noise


def test_sample_long_video_from_a_random_video_model(tmp_path, capsys):
    """--target-length beyond --num-frames: the attention window slides; the MP4 decodes to
    the requested number of frames and the first window equals ordinary sampling."""
    from starflow_jax.sampling.visualize import read_video_frames

    out = tmp_path / "long.mp4"
    common = [
        "sample",
        "--config",
        VIDEO_TINY,
        "--random-init",
        "--labels",
        "3,7",
        "--num",
        "2",
        "--seed",
        "5",
        "--no-denoise",
    ]
    assert (
        main(
            common
            + ["--num-frames", "3", "--target-length", "7", "--out", str(out), "--save-npy", str(tmp_path / "long.npy")]
        )
        == 0
    )
    assert read_video_frames(out).shape[0] == 7
    long = np.load(tmp_path / "long.npy")
    assert long.shape == (2, 7, 1, 8, 8) and np.all(np.isfinite(long))
    assert "sampling frames" in capsys.readouterr().err
    assert (
        main(
            common
            + ["--num-frames", "3", "--out", str(tmp_path / "short.gif"), "--save-npy", str(tmp_path / "short.npy")]
        )
        == 0
    )
    short = np.load(tmp_path / "short.npy")
    # the noise of the first 3 frames differs (drawn for another shape): compare via the
    # library instead, same noise
    import jax

    from starflow_jax.cli import model_source
    from starflow_jax.flow.labels import one_hot_labels

    class A:  # the arguments load_model reads
        config, overrides, weights, workdir, random_init, step, ema = VIDEO_TINY, [], None, None, True, None, False

    _, model = model_source.load_model(A, seed=5)
    noise = jax.random.normal(jax.random.key(5), (2, 7, 1, 8, 8), jnp.float32)
    y = one_hot_labels(jnp.asarray([3, 7]), model.cfg.txt_dim - 1)
    first = sample(model, noise[:, :3], y, SamplingOptions())
    assert rc.relative_error(long[:, :3], np.asarray(first)) < 1e-4
    assert short.shape == (2, 3, 1, 8, 8)


def test_sample_image_to_video_keeps_the_image(tmp_path):
    img = (np.arange(64).reshape(8, 8) * 4).astype(np.uint8)
    Image.fromarray(img, mode="L").save(tmp_path / "first.png")
    assert (
        main(
            [
                "sample",
                "--config",
                VIDEO_TINY,
                "--random-init",
                "--labels",
                "1",
                "--num",
                "2",
                "--num-frames",
                "3",
                "--input-image",
                str(tmp_path / "first.png"),
                *EXACT,
                "--out",
                str(tmp_path / "i2v.mp4"),
                "--save-npy",
                str(tmp_path / "x.npy"),
            ]
        )
        == 0
    )
    x = np.load(tmp_path / "x.npy")
    want = img.astype(np.float32) / 127.5 - 1.0
    np.testing.assert_array_equal(x[:, 0, 0], np.broadcast_to(want, (2, 8, 8)))
    assert not np.allclose(x[:, 1], x[:, 0])


def test_sample_video_to_video_keeps_the_clip(tmp_path):
    from starflow_jax.sampling.visualize import read_video_frames, save_mp4

    clip = [np.full((8, 8, 3), v, np.uint8) for v in (30, 120, 220)]
    save_mp4(tmp_path / "in.mp4", clip, fps=4)
    decoded = read_video_frames(tmp_path / "in.mp4")
    assert (
        main(
            [
                "sample",
                "--config",
                VIDEO_TINY,
                "--random-init",
                "--labels",
                "2",
                "--num",
                "1",
                "--num-frames",
                "4",
                "--input-video",
                str(tmp_path / "in.mp4"),
                "--input-frames",
                "2",
                *EXACT,
                "--out",
                str(tmp_path / "v2v.gif"),
                "--save-npy",
                str(tmp_path / "x.npy"),
            ]
        )
        == 0
    )
    x = np.load(tmp_path / "x.npy")
    grey = np.asarray([Image.fromarray(f).convert("L") for f in decoded[:2]], np.float32) / 127.5 - 1.0
    np.testing.assert_array_equal(x[0, :2, 0], grey)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--config", TINY, "--labels", "1", "--target-length", "5", "--out", "x.png"], "needs a video model"),
        (["--config", TINY, "--labels", "1", "--input-image", "x.png", "--out", "x.png"], "need a video model"),
        (
            [
                "--config",
                VIDEO_TINY,
                "--labels",
                "1",
                "--num-frames",
                "3",
                "--input-image",
                "nope.png",
                "--out",
                "x.gif",
            ],
            "does not exist",
        ),
        (
            [
                "--config",
                VIDEO_TINY,
                "--labels",
                "1",
                "--num-frames",
                "3",
                "--target-length",
                "6",
                "--context-frames",
                "3",
                "--out",
                "x.gif",
            ],
            "context_frames must lie in",
        ),
        (["--config", VIDEO_TINY, "--labels", "1", "--num-frames", "0", "--out", "x.gif"], "--num-frames must be >= 1"),
    ],
)
def test_sample_video_bad_arguments(extra, message, capsys, tmp_path):
    args = ["sample", "--random-init"] + extra
    args[args.index("--out") + 1] = str(tmp_path / args[args.index("--out") + 1])
    assert main(args) == 2
    assert message in capsys.readouterr().err
