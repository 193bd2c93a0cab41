"""Moving digits (the video main job's data): clips are the digit rolled by a constant
velocity, deterministic per index; a video model trains on them through the usual loop
(held-out bits per dimension, the Gaussian baselines, a sample grid of frames)."""

import pathlib

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from starflow_jax.config import load_config, model_config
from starflow_jax.data.moving_digits import VELOCITIES, MovingDigitsSource, parse_velocities, shift_clip
from starflow_jax.data.sources import make_data
from starflow_jax.model import StarFlow
from starflow_jax.train.loop import evaluate, train
from starflow_jax.train.program import step_settings
from starflow_jax.workdir.params import load_params

ROOT = pathlib.Path(__file__).resolve().parents[1]
VIDEO_TINY = ROOT / "configs" / "video_tiny_cpu.py"


def test_shift_clip_rolls_with_wraparound():
    img = np.arange(16, dtype=np.float32).reshape(1, 4, 4)
    clip = shift_clip(img, 3, (1, -1), (0, 2))
    assert clip.shape == (3, 1, 4, 4)
    for k in range(3):
        np.testing.assert_array_equal(clip[k], np.roll(img, (k, 2 - k), axis=(-2, -1)))


def test_source_is_deterministic_and_moves():
    imgs = np.random.default_rng(0).uniform(-1, 1, (5, 1, 8, 8)).astype(np.float32)
    src = MovingDigitsSource(imgs, np.arange(5), num_frames=4, seed=3)
    a, b = src[2], MovingDigitsSource(imgs, np.arange(5), num_frames=4, seed=3)[2]
    np.testing.assert_array_equal(a["image"], b["image"])
    assert a["image"].shape == (4, 1, 8, 8) and int(a["label"]) == 2
    # every frame is the first one rolled by k times one of the velocities
    v = [tuple(d) for d in VELOCITIES if np.array_equal(np.roll(a["image"][0], tuple(d), axis=(-2, -1)), a["image"][1])]
    assert len(v) >= 1
    np.testing.assert_array_equal(a["image"][3], np.roll(a["image"][0], (3 * v[0][0], 3 * v[0][1]), axis=(-2, -1)))
    with pytest.raises(ValueError, match="num_frames"):
        MovingDigitsSource(imgs, np.arange(5), num_frames=0)


def test_clip_variants_show_each_digit_moving_in_several_ways():
    imgs = np.random.default_rng(0).uniform(-1, 1, (5, 1, 8, 8)).astype(np.float32)
    one = MovingDigitsSource(imgs, np.arange(5), num_frames=3, seed=1)
    three = MovingDigitsSource(imgs, np.arange(5), num_frames=3, seed=1, variants=3)
    assert len(one) == 5 and len(three) == 15
    for i in range(5):  # the first clips are the one-variant source's
        np.testing.assert_array_equal(three[i]["image"], one[i]["image"])
    # clip j is image j mod 5, with its own velocity and offset
    for j in range(15):
        assert int(three[j]["label"]) == j % 5
        assert any(
            np.array_equal(three[j]["image"][0], np.roll(imgs[j % 5], (y, x), (-2, -1)))
            for y in range(8)
            for x in range(8)
        )
    assert len({three[j]["image"].tobytes() for j in (0, 5, 10)}) == 3
    np.testing.assert_array_equal(three.clips(), one.clips())  # one clip per image (baselines, real frames)
    with pytest.raises(IndexError):
        three[15]
    with pytest.raises(ValueError, match="variants"):
        MovingDigitsSource(imgs, np.arange(5), num_frames=3, variants=0)
    data = make_data(load_config(VIDEO_TINY, ["data.clip_variants=4"]))
    assert len(data.train) == 4 * len(data.train_images) and len(data.heldout) == len(data.heldout_images)


def test_chosen_velocities_make_clips_of_those_velocities_only():
    config = load_config(VIDEO_TINY, ["data.velocities=0,2;-1,0", "model.txt_dim=21"])
    data = make_data(config)
    for i in range(20):
        clip = data.train[i]["image"]
        moves = {
            (dy, dx) for dy, dx in [(0, 2), (-1, 0)] if np.array_equal(np.roll(clip[0], (dy, dx), (-2, -1)), clip[1])
        }
        assert moves, i
    # the default draws the clips it always drew (same velocity per index as before the option)
    np.testing.assert_array_equal(parse_velocities(""), VELOCITIES)
    default = make_data(load_config(VIDEO_TINY, []))
    imgs, labels = default.train.images, default.train.labels
    np.testing.assert_array_equal(default.train[5]["image"], MovingDigitsSource(imgs, labels, 4, seed=0)[5]["image"])
    for bad in ("1", "a,b", "1,2,3", ";"):
        with pytest.raises(ValueError, match="data.velocities"):
            parse_velocities(bad)


def test_moving_digits_need_a_video_model():
    config = load_config(VIDEO_TINY, ["model.temporal_causal=0", "model.shallow_block_local=False"])
    with pytest.raises(ValueError, match="must be a video model"):
        make_data(config)


@pytest.mark.slow
def test_video_main_job_trains_a_few_steps(tmp_path):
    config = load_config(
        VIDEO_TINY,
        [
            "train.steps=4",
            "train.batch_size=8",
            "train.warmup_steps=1",
            "train.log_every=2",
            "train.eval_every=4",
            "train.checkpoint_every=4",
            "data.num_train=200",
            "model.channels=32",
            "sample.scale=1",
            "eval.num_samples=8",  # the clips' quality at the end: digits FD over frames, motion
            "eval.batch_size=8",
        ],
    )
    result = train(config, str(tmp_path), log=lambda *a: None)
    assert np.isfinite(result["heldout_bpd"]) and "gaussian_full_cov_bpd" in result
    for key in ("digits_fd", "accuracy", "accuracy_real", "motion_score", "motion_score_real"):
        assert np.isfinite(result[key]), key
    # one row of 4 frames per digit (motion labels: digit d moving by velocity d mod 8): 10 rows x 4
    # columns of 8x8 with 1-pixel padding
    png = np.asarray(Image.open(tmp_path / "samples.png"))
    assert png.shape == (10 * 9 + 1, 4 * 9 + 1)
    # the preview is denoised: every pixel is one of the data's 17 grey levels (or padding)
    levels = int(config.train.levels)
    allowed = set(np.round(np.arange(levels) / (levels - 1) * 255).astype(int).tolist()) | {0}
    assert set(np.unique(png).tolist()) <= allowed
    # the reported held-out bits per dimension are those of the saved parameters
    _, _, params = load_params(tmp_path)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: StarFlow(model_config(config), rngs=nnx.Rngs(0))))
    data = make_data(config)
    bpd = evaluate(config, graphdef, params, data.heldout, step_settings(config, data.num_classes))
    np.testing.assert_allclose(bpd, result["heldout_bpd"], rtol=1e-5)


def test_motion_labels_name_the_digit_and_the_velocity():
    from starflow_jax.data.moving_digits import (
        VELOCITIES,
        MovingDigitsSource,
        config_classes,
        label_digit,
        motion_label,
    )

    images = np.random.default_rng(0).uniform(-1, 1, (5, 1, 8, 8)).astype(np.float32)
    labels = np.arange(5, dtype=np.int32)
    plain = MovingDigitsSource(images, labels, 3, seed=1)
    src = MovingDigitsSource(images, labels, 3, seed=1, motion_labels=True)
    for j in range(5):
        a, b = plain[j], src[j]
        np.testing.assert_array_equal(a["image"], b["image"])
        digit, v = int(b["label"]) % 10, VELOCITIES[int(b["label"]) // 10]
        assert motion_label(digit, int(b["label"]) // 10) == int(b["label"])
        assert label_digit(b["label"]) == digit
        assert digit == a["label"]
        np.testing.assert_array_equal(b["image"][1], np.roll(b["image"][0], tuple(v), axis=(-2, -1)))
    # the video main job labels digit and velocity: 80 classes; without motion labels the 10 digits
    config = load_config(VIDEO_TINY)
    assert config_classes(config) == make_data(config).num_classes == 80
    config.data.motion_labels = False
    with pytest.raises(ValueError, match="needs txt_dim=11"):  # the main job's model, labels without the motion
        make_data(config)
    config.model.txt_dim = 11
    assert config_classes(config) == make_data(config).num_classes == 10
    config.data.motion_labels = True
    with pytest.raises(ValueError, match=r"80 labels \(digit \+ 10 x velocity index.*needs txt_dim=81"):
        make_data(config)
