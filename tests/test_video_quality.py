"""How well a video model models moving digits: held-out bits per dimension per frame
(frame 1, and each later frame given the frames before it) and the motion score of clips."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from starflow_jax.config import load_config, model_config
from starflow_jax.data.moving_digits import (
    VELOCITIES,
    describe_motion,
    motion_errors,
    motion_report,
    motion_score,
    shift_clip,
    shuffle_frames,
)
from starflow_jax.data.sources import make_data
from starflow_jax.flow.loss import bits_per_dim, nll_per_example
from starflow_jax.flow.noise import add_noise
from starflow_jax.model import StarFlow
from starflow_jax.model.starflow import FlowOutput
from starflow_jax.train.loop import HeldOutBpd, data_scale, heldout_bpd
from starflow_jax.train.program import step_settings

ROOT = pathlib.Path(__file__).resolve().parents[1]
VIDEO_TINY = ROOT / "configs" / "video_tiny_cpu.py"


def _random_model(overrides=()):
    """A small video model with random (not identity) affine outputs."""
    config = load_config(VIDEO_TINY, ["model.channels=32", *overrides])
    model = StarFlow(model_config(config), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(tree, [p + 0.3 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
    return config, nnx.merge(graphdef, params)


LAYOUTS = [
    (),  # the main job: frame-local shallow blocks, time-causal deep block (flipped within frames)
    ("model.shallow_block_local=False",),  # every block over the whole clip, flips within frames
    ("model.num_blocks=2", "model.layers_per_block=1,2"),  # the deep block in raster order
]


@pytest.mark.parametrize("overrides", LAYOUTS)
def test_per_frame_nll_sums_to_the_clip_nll_and_is_causal(overrides):
    config, model = _random_model(overrides)
    x = jax.random.uniform(jax.random.key(2), (3, 4, 1, 8, 8), minval=-1, maxval=1)
    y = jax.nn.one_hot(jnp.array([[1], [4], [7]]), model.cfg.txt_dim)

    @nnx.jit
    def nlls(model, x):
        out = model(x, y)
        return model.nll_per_frame(out), nll_per_example(out.z, out.logdets)

    frames, whole = nlls(model, x)
    assert frames.shape == (3, 4)
    # every frame has as many dimensions: the clip's NLL per dimension is the frames' mean
    np.testing.assert_allclose(frames.mean(1), whole, rtol=1e-5, atol=1e-6)
    # time-causal: frame k's NLL depends on frames <= k only, and does change with frame k
    for k in range(4):
        frames2, _ = nlls(model, x.at[:, k].set(-x[:, k]))
        np.testing.assert_allclose(frames2[:, :k], frames[:, :k], rtol=1e-5, atol=1e-6)
        assert np.all(np.abs(np.asarray(frames2[:, k] - frames[:, k])) > 1e-4)


def test_per_frame_nll_needs_a_video():
    cfg = model_config(load_config(VIDEO_TINY))
    model = nnx.eval_shape(lambda: StarFlow(cfg, rngs=nnx.Rngs(0)))  # the check reads no parameter
    z = jnp.zeros((2, 1, 8, 8))  # an image forward pass
    with pytest.raises(ValueError, match="video forward pass"):
        model.nll_per_frame(FlowOutput(z, [jnp.zeros((2, 16, 4))] * 3, []))


def test_heldout_bpd_per_frame_averages_to_the_clip_bpd():
    config, model = _random_model(["data.num_train=1765"])  # 32 held-out clips: two batches of 16
    data = make_data(config)
    graphdef, params = nnx.split(model)
    held = heldout_bpd(config, graphdef, params, data.heldout, step_settings(config, data.num_classes), batch_size=16)
    assert len(held.frames) == 4
    # frame 1 and the mean of the 3 later frames, weighted by their frame counts, give the clip's
    np.testing.assert_allclose((held.first_frame + 3 * held.later_frames) / 4, held.bpd, rtol=1e-5)
    np.testing.assert_allclose(np.mean(held.frames), held.bpd, rtol=1e-5)
    # the clip's bits per dimension are those of the whole-clip NLL (one dequantisation draw per batch)
    clip_nll = nnx.jit(lambda model, x, y: nll_per_example(*model(x, y)[:2]))
    nll = []
    for i in range(0, len(data.heldout), 16):
        idx = range(i, min(i + 16, len(data.heldout)))
        batch = [data.heldout[j] for j in idx]
        x = add_noise(
            jax.random.key(1234 + i),
            jnp.stack([b["image"] for b in batch]),
            0.0,
            "uniform",
            int(config.train.levels),
        )
        y = jax.nn.one_hot(jnp.array([[int(b["label"])] for b in batch]), model.cfg.txt_dim)
        nll.append(np.asarray(clip_nll(model, x, y)))
    whole = float(bits_per_dim(float(np.mean(np.concatenate(nll))), data_scale(config)))
    np.testing.assert_allclose(held.bpd, whole, rtol=1e-5)
    fields = held.fields()
    assert fields["heldout_bpd_frame1"] == held.frames[0] and len(fields["heldout_bpd_per_frame"]) == 4
    assert "frame 1" in held.describe()
    assert HeldOutBpd(2.0).fields() == {"heldout_bpd": 2.0} and HeldOutBpd(2.0).describe() == "2.000"


def _clips(n=12, t=4, seed=0):
    rng = np.random.default_rng(seed)
    imgs = rng.uniform(-1, 1, (n, 1, 8, 8))
    return np.stack([shift_clip(im, t, tuple(VELOCITIES[i % 8]), (i % 8, 3)) for i, im in enumerate(imgs)])


def test_motion_score_is_zero_on_rolled_clips_and_large_on_shuffled_frames():
    clips = _clips()
    assert motion_score(clips) == 0.0
    np.testing.assert_array_equal(motion_errors(clips), 0.0)
    shuffled = shuffle_frames(clips, seed=1)
    assert motion_score(shuffled) > 0.2  # uniform noise frames: |a - b| / 2 averages 1/3
    # a clip whose digit stands still, or moves by 2 pixels a frame, is not a moving digit either
    still = np.repeat(clips[:, :1], 4, axis=1)
    assert motion_score(still) > 0.2
    report = motion_report(shuffled, clips)
    assert report["motion_score_real"] == 0.0 and report["motion_score_shuffled"] > 0.2
    with pytest.raises(ValueError, match="t >= 2"):
        motion_score(clips[:, :1])
    with pytest.raises(ValueError, match="NaN"):
        motion_score(np.full_like(clips, np.nan))


def test_motion_score_measures_against_the_clips_own_velocities():
    """Diagnostic clip sets (``data.velocities``) are scored against their own velocities:
    clips moving 2 pixels a frame score 0 against that set, not against the default 8."""
    from starflow_jax.data.moving_digits import config_velocities, parse_velocities

    fast = parse_velocities("2,2;2,0;0,-2")
    rng = np.random.default_rng(3)
    clips = np.stack(
        [shift_clip(im, 4, tuple(fast[i % 3]), (i, 1)) for i, im in enumerate(rng.uniform(-1, 1, (6, 1, 8, 8)))]
    )
    assert motion_score(clips, fast) == 0.0 and motion_score(clips) > 0.2
    assert motion_report(clips, clips, velocities=fast)["motion_score_real"] == 0.0
    config = load_config(VIDEO_TINY)
    np.testing.assert_array_equal(config_velocities(config), VELOCITIES)
    config.data.velocities = "2,2;2,0;0,-2"
    np.testing.assert_array_equal(config_velocities(config), fast)


def test_real_moving_digits_score_zero():
    config = load_config(VIDEO_TINY)
    data = make_data(config)
    clips = np.stack([data.heldout[i]["image"] for i in range(len(data.heldout))])
    assert motion_score(clips) == 0.0
    assert motion_score(shuffle_frames(clips)) > 0.05


@pytest.mark.slow
def test_train_report_and_nll_cli_give_per_frame_bpd_and_motion(tmp_path, capsys):
    from starflow_jax.cli.main import main
    from starflow_jax.train.loop import train

    config = load_config(
        VIDEO_TINY,
        [
            "train.steps=2",
            "train.batch_size=8",
            "train.warmup_steps=1",
            "train.log_every=2",
            "train.eval_every=2",
            "train.checkpoint_every=2",
            "data.num_train=1700",
            "model.channels=32",
            "sample.scale=1",
            "eval.num_samples=0",
        ],
    )
    result = train(config, str(tmp_path), log=print)
    log = capsys.readouterr().out
    assert "frame 1" in log and "later frames" in log and "motion score" in log
    saved = json.loads((tmp_path / "result.json").read_text())
    frames = saved["heldout_bpd_per_frame"]
    np.testing.assert_allclose(np.mean(frames), saved["heldout_bpd"], rtol=1e-5)
    np.testing.assert_allclose(saved["heldout_bpd_later_frames"], np.mean(frames[1:]), rtol=1e-6)
    assert saved["motion_score_real"] == 0.0 and saved["motion_score"] > 0 and "motion_score_shuffled" in saved
    row = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()][-1]
    assert row["heldout_bpd_frame1"] == saved["heldout_bpd_frame1"] == result["heldout_bpd_frame1"]
    # the nll command reports the same per-frame numbers for the workdir's held-out split
    assert main(["nll", "--workdir", str(tmp_path), "--json", str(tmp_path / "nll.json")]) == 0
    nll = json.loads((tmp_path / "nll.json").read_text())
    np.testing.assert_allclose(nll["bits_per_dim_per_frame"], frames, rtol=1e-5)
    assert "later frames (mean)" in capsys.readouterr().out
    # and the sample command prints the motion score of what it draws
    out = tmp_path / "s.png"
    assert (
        main(
            [
                "sample",
                "--workdir",
                str(tmp_path),
                "--labels",
                "1,2",
                "--num",
                "2",
                "--out",
                str(out),
                "--quantize",
                "--motion-score",
            ]
        )
        == 0
    )
    assert "motion score" in capsys.readouterr().out


def test_the_motion_floor_of_unrounded_samples_is_the_dequantised_real_clips():
    """Unrounded samples of a uniformly dequantising run are measured against the real clips
    dequantised as trained (what an exact model's samples score: one grey step's uniform
    noise per frame, mean |u - u'| = 1/3 of a bin); rounded samples against the real clips (0)."""
    from starflow_jax.data.moving_digits import dequantised, unrounded_floor_levels
    from starflow_jax.flow.noise import quantize

    config = load_config(VIDEO_TINY)
    clips = np.asarray(quantize(jnp.asarray(_clips()), 17))  # on the data's 17 grey levels
    levels = unrounded_floor_levels(config, rounded=False)
    assert levels == int(config.train.levels) == 17
    assert unrounded_floor_levels(config, rounded=True) is None
    config.train.noise_type = "gaussian"
    assert unrounded_floor_levels(config, rounded=False) is None
    noisy = dequantised(clips, levels, seed=2)
    np.testing.assert_array_equal(np.asarray(quantize(noisy, levels)), clips)  # within each value's bin
    report = motion_report(noisy, clips, levels=levels)
    floor = report["motion_score_real_dequantised"]
    assert floor == pytest.approx(1.0 / (3 * levels), rel=0.1)  # 0.0196 for 17 levels
    assert report["motion_score"] == pytest.approx(floor, rel=0.1) and report["motion_score_real"] == 0.0
    assert "dequantised as trained" in describe_motion(report)
    assert "motion_score_real_dequantised" not in motion_report(noisy, clips)
