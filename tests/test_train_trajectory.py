"""Training that matches the reference step for step (``bench train --trajectory``): the
reference's learning-rate schedule, PyTorch's gradient clipping, the denoiser's never-zeroed
gradients (``train.denoiser_accumulate_grads``), the step's random draws handed out by
``step_draws``; with ``$STARFLOW_REFERENCE_REPO``, short trajectories of the digits, a text
latent and a video (learnable denoiser, drop_image) config against the reference's
``train.py`` step."""

import json
import math
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from starflow_jax.bench import train_trajectory as T
from starflow_jax.cli.main import main
from starflow_jax.config import load_config, model_config
from starflow_jax.model import StarFlow
from starflow_jax.train import objective, optimizer
from starflow_jax.train import step as S

ROOT = pathlib.Path(__file__).resolve().parents[1]
REFERENCE_REPO = os.environ.get("STARFLOW_REFERENCE_REPO")


def _reference_lrs(lr, min_lr, warmup, total, n):
    """The learning rate each of ``n`` updates runs at, by the rule of the reference's
    ``CosineLRSchedule`` (built at ``min_lr``, stepped after each update; a new value only
    applied inside ``[min_lr, lr]``), written out independently here."""
    start, current, out = min(min_lr, 1e-6), min_lr, []
    for c in range(n + 1):
        if c > 0:
            if c <= warmup:
                new = start + c / warmup * (lr - start)
            else:
                new = min_lr + 0.5 * (1 + math.cos(math.pi * (c - warmup) / (total - warmup))) * (lr - min_lr)
            if min_lr <= new <= lr:
                current = new
        out.append(current)
    return out


@pytest.mark.parametrize("lr,min_lr,warmup,total", [(1e-3, 1e-5, 4, 12), (1e-4, 1e-6, 3, 10), (5e-4, 0.0, 0, 8)])
def test_lr_schedule_is_the_references(lr, min_lr, warmup, total):
    expected = _reference_lrs(lr, min_lr, warmup, total, total + 1)
    flow = optimizer.lr_schedule(lr, min_lr, warmup, total)
    den = optimizer.lr_schedule(lr, min_lr, warmup, total, offset=1)  # stepped before its optimizer
    for step in range(total):
        np.testing.assert_allclose(float(flow(step)), expected[step], rtol=1e-5)  # float32
        np.testing.assert_allclose(float(den(step)), expected[step + 1], rtol=1e-5)
    assert float(flow(0)) == pytest.approx(min_lr)  # the first update runs at min_lr, not 0
    with pytest.raises(ValueError, match="min_lr <= lr"):
        optimizer.lr_schedule(1e-4, 1e-3, 2, 10)
    with pytest.raises(ValueError, match="warmup_steps must be >= 0"):
        optimizer.lr_schedule(1e-4, 1e-6, -1, 10)


@pytest.mark.skipif(not REFERENCE_REPO, reason="STARFLOW_REFERENCE_REPO is unset: no apple/ml-starflow checkout")
def test_lr_schedule_against_the_reference_class():
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("ref_training", pathlib.Path(REFERENCE_REPO) / "utils/training.py")
    training = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(training)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = training.CosineLRSchedule(opt, 5, 20, 1e-5, 2e-3)
    ours = optimizer.lr_schedule(2e-3, 1e-5, 5, 20)
    for step in range(20):
        np.testing.assert_allclose(float(ours(step)), opt.param_groups[0]["lr"], rtol=1e-6)
        sched.step()


def test_clipping_is_torchs():
    """``min(1, max_norm / (norm + 1e-6))``, as ``torch.nn.utils.clip_grad_norm_``."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    grads = {"a": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=(5,)).astype(np.float32)}
    for max_norm in (0.5, 1e3):
        tx = optimizer.clip_by_global_norm(max_norm)
        out, _ = tx.update(jax.tree.map(jnp.asarray, grads), tx.init(grads))
        ps = [torch.nn.Parameter(torch.zeros(v.shape)) for v in grads.values()]
        for p, v in zip(ps, grads.values()):
            p.grad = torch.from_numpy(v.copy())
        torch.nn.utils.clip_grad_norm_(ps, max_norm)
        for p, v in zip(ps, out.values()):
            np.testing.assert_allclose(np.asarray(v), p.grad.numpy(), rtol=1e-6)


def test_unzeroed_denoiser_gradients_add_up_clipped():
    """``train.denoiser_accumulate_grads``: each update uses the new gradients plus the
    clipped ones the previous update used (the reference never zeroes them)."""
    tx = optimizer.unzeroed_grads(1.0)
    g1, g2 = {"w": jnp.array([3.0, 4.0])}, {"w": jnp.array([0.1, -0.2])}
    state = tx.init(g1)
    u1, state = tx.update(g1, state)
    np.testing.assert_allclose(np.asarray(u1["w"]), np.array([3.0, 4.0]) / (5 + 1e-6), rtol=1e-6)
    u2, state = tx.update(g2, state)
    total = np.asarray(u1["w"]) + np.array([0.1, -0.2])
    np.testing.assert_allclose(np.asarray(u2["w"]), total * min(1.0, 1.0 / (np.linalg.norm(total) + 1e-6)), rtol=1e-6)
    # unclipped: a plain running sum; and off by default in the program
    plain = optimizer.unzeroed_grads(0.0)
    s = plain.init(g1)
    _, s = plain.update(g1, s)
    u, _ = plain.update(g1, s)
    np.testing.assert_allclose(np.asarray(u["w"]), [6.0, 8.0])


def test_the_step_trains_on_the_draws_step_draws_gives():
    """The loss the step reports is the model's loss on ``step_inputs(batch, step_draws(key))``
    with the step's own key: what ``--trajectory`` hands the reference is what was trained on."""
    config = load_config(ROOT / "configs" / "tiny_cpu.py", ["model.channels=32", "model.layers_per_block=[1, 0, 1]"])
    model = StarFlow(model_config(config), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    batch = dict(
        image=jnp.asarray(rng.uniform(-1, 1, (8, 1, 8, 8)).astype(np.float32)),
        label=jnp.asarray(rng.integers(0, 10, 8).astype(np.int32)),
    )
    hp = S.StepConfig(noise_std=0.0, noise_type="uniform", levels=17, num_classes=10, drop_label=0.5)
    tx = optimizer.adamw(optax.constant_schedule(1e-3))
    state = S.init_state(model, tx, 3, ema=False)
    draws = S.step_draws(S.step_key(state.rng, state.step), batch, hp)
    assert draws["drop"].shape == (8,) and 0 < int(draws["drop"].sum()) < 8
    x, y = S.step_inputs(batch, draws, hp)
    assert float(y[:, 0, 10].sum()) == int(draws["drop"].sum())  # dropped rows: the null class
    expected = objective.flow_loss(model(x, y))
    _, m = S.train_step(state, batch, graphdef=nnx.graphdef(model), tx=tx, hp=hp)
    np.testing.assert_allclose(float(m["loss"]), float(expected), rtol=1e-6)
    # captions: dropped rows are zeros
    y_text = jnp.ones((8, 2, 3))
    hp_text = S.StepConfig(drop_label=0.5)
    d = S.step_draws(jax.random.key(1), dict(image=batch["image"], cond=y_text), hp_text)
    _, yd = S.step_inputs(dict(image=batch["image"], cond=y_text), d, hp_text)
    np.testing.assert_array_equal(np.asarray(yd[:, 0, 0]), np.where(np.asarray(d["drop"]), 0.0, 1.0))
    assert S.step_draws(jax.random.key(1), dict(image=batch["image"]), hp_text)["drop"] is None


def test_trajectory_rejects_what_it_cannot_compare(capsys):
    tiny = str(ROOT / "configs" / "tiny_cpu.py")
    with pytest.raises(ValueError, match="grad_accum must be 1"):
        T.trajectory_config(tiny, ["train.grad_accum=2"], None)
    with pytest.raises(ValueError, match="fixes b2 = 0.95"):
        T.trajectory_config(tiny, ["train.b2=0.99"], None)
    assert main(["bench", "train", "--config", tiny, "--trajectory", "2"]) == 2
    assert "give --reference PATH" in capsys.readouterr().err
    assert main(["bench", "train", "--config", tiny, "--trajectory", "0", "--reference", "x"]) == 2
    assert "number of updates >= 1" in capsys.readouterr().err
    config = T.trajectory_config(tiny, ["model.dtype=bfloat16"], 4)
    assert config.model.dtype == "float32" and config.train.batch_size == 4


CASES = {
    "digits": ("tiny_cpu.py", ["model.channels=32", "train.ema_decay=0.9", "train.warmup_steps=1"]),
    "t2i": (
        "starflow_3b_t2i_256_tiny.py",
        ["model.channels=32", "model.txt_dim=16", "model.txt_size=4", "model.img_size=4", "train.ema_decay=0.9"],
    ),
    "t2v_denoiser": (
        "t2v_latents_tiny.py",
        [
            "model.learnable_self_denoiser=True",
            "model.channels=32",
            "model.layers_per_block=[1, 1, 1]",
            "model.txt_dim=16",
            "model.txt_size=4",
            "model.img_size=4",
            "data.num_frames=2",
            "train.drop_image=0.5",
            "train.latent_norm_regularization=1e-4",
            "train.ema_decay=0.9",
            "train.warmup_steps=1",
            "train.denoiser_accumulate_grads=True",
        ],
    ),
}


@pytest.mark.slow
@pytest.mark.skipif(not REFERENCE_REPO, reason="STARFLOW_REFERENCE_REPO is unset: no apple/ml-starflow checkout")
@pytest.mark.parametrize("case", sorted(CASES))
def test_trajectory_matches_the_reference(case, tmp_path):
    name, overrides = CASES[case]
    out = tmp_path / "trajectory.json"
    argv = ["bench", "train", "--config", str(ROOT / "configs" / name), "--batch", "4", "--trajectory", "3"]
    argv += [a for o in overrides for a in ("--set", o)]
    assert main([*argv, "--reference", REFERENCE_REPO, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert len(result["steps"]) == 3
    worst = result["max"]
    for key in ("loss_rel", "grad_norm_rel", "lr_rel", "params_rel", "ema_rel"):
        assert worst[key] < 1e-5, (key, worst)
    if case == "t2v_denoiser":
        assert worst["denoiser_loss_rel"] < 1e-5 and worst["denoiser_lr_rel"] < 1e-5, worst


def test_quality_settings_and_plot(tmp_path):
    from starflow_jax.bench import train_quality as Q

    assert Q.parse_points("3000, 500,1000") == [500, 1000, 3000]
    for bad in ("", "0,5", "a,b"):
        with pytest.raises(ValueError, match="--quality-steps"):
            Q.parse_points(bad)
    with pytest.raises(ValueError, match="embedded digits"):
        Q.quality_config(str(ROOT / "configs" / "t2i_latents_tiny.py"), [], None)
    assert Q.quality_config(str(ROOT / "configs" / "tiny_cpu.py"), [], None).train.batch_size == 128
    out = tmp_path / "q.png"
    Q.plot(str(out), [dict(seconds=1.0, bpd=3.0), dict(seconds=2.0, bpd=2.5)], [dict(seconds=3.0, bpd=2.9)], "t")
    from PIL import Image

    with Image.open(out) as im:
        assert im.size == (720, 480)
        colours = {c for _, c in im.getcolors(1 << 16)}
        assert (0, 0, 255) in colours and (255, 0, 0) in colours  # both curves drawn


@pytest.mark.slow
@pytest.mark.skipif(not REFERENCE_REPO, reason="STARFLOW_REFERENCE_REPO is unset: no apple/ml-starflow checkout")
def test_quality_runs_both_sides(tmp_path):
    out, png = tmp_path / "quality.json", tmp_path / "quality.png"
    argv = ["bench", "train", "--config", str(ROOT / "configs" / "tiny_cpu.py"), "--set", "model.channels=32"]
    argv += ["--batch", "16", "--quality", "--quality-steps", "2,4", "--plot", str(png), "--json", str(out)]
    assert main([*argv, "--reference", REFERENCE_REPO]) == 0
    result = json.loads(out.read_text())
    assert [r["step"] for r in result["rows"]] == [0, 2, 4] and png.is_file()
    start = result["rows"][0]  # the same weights and dequantisation draw: the same held-out bits/dim
    assert start["bpd_jax"] == pytest.approx(start["bpd_ref"], rel=1e-5)
    for r in result["rows"][1:]:
        assert 0 < r["bpd_jax"] < 10 and 0 < r["bpd_ref"] < 10 and r["seconds_jax"] > 0 and r["seconds_ref"] > 0


@pytest.mark.slow
@pytest.mark.skipif(not REFERENCE_REPO, reason="STARFLOW_REFERENCE_REPO is unset: no apple/ml-starflow checkout")
def test_quality_on_moving_digits_gives_the_same_frames_at_the_start(tmp_path):
    out = tmp_path / "quality.json"
    argv = ["bench", "train", "--config", str(ROOT / "configs" / "video_tiny_cpu.py"), "--set", "model.channels=32"]
    argv += ["--batch", "8", "--quality", "--quality-steps", "2", "--json", str(out), "--reference", REFERENCE_REPO]
    # the main job's position options are ours: off, both train the same model
    ours_off = ["--set", "model.rope_wrap=False", "--set", "model.rope_content_keys=False"]
    assert main(argv + ours_off) == 0
    result = json.loads(out.read_text())
    start = result["rows"][0]
    assert result["reference_without"] == []
    for key in ("bpd", "bpd_frame1", "bpd_later"):  # the reference's per frame read from clip prefixes
        assert start[f"{key}_jax"] == pytest.approx(start[f"{key}_ref"], rel=1e-5), key
    # on: the reference trains its nearest model (the same weights, its own positions), and says so
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert result["reference_without"] == ["model.rope_wrap", "model.rope_content_keys"]
    assert [r["step"] for r in result["rows"]] == [0, 2] and all(0 < r["bpd_ref"] < 10 for r in result["rows"])


def test_quality_trains_on_every_clip_variant():
    """``bench train --quality`` on moving digits draws from the same clips as ``train``:
    ``data.clip_variants`` clips per training digit, each with its own motion."""
    from starflow_jax.bench.train_quality import _splits
    from starflow_jax.config import load_config
    from starflow_jax.data.sources import make_data

    config = load_config(ROOT / "configs" / "video_tiny_cpu.py", ["data.clip_variants=3", "data.num_train=40"])
    train, held = _splits(config)
    data = make_data(config)
    assert train.images.shape == (120, 4, 1, 8, 8) and train.labels.shape == (120,)
    np.testing.assert_array_equal(train.images[77], data.train[77]["image"])
    assert train.labels[77] == data.train[77]["label"]
    np.testing.assert_array_equal(held.images, data.heldout_images)


def test_per_frame_nll_from_clip_prefixes_equals_the_models_own():
    """``prefix_frame_nll`` (how the reference's per-frame NLL is read) agrees with
    ``StarFlow.nll_per_frame`` on a time-causal model with frame-local shallow blocks."""
    from flax import nnx

    from starflow_jax.bench.train_quality import prefix_frame_nll
    from starflow_jax.config import load_config, model_config
    from starflow_jax.flow.labels import one_hot_labels
    from starflow_jax.flow.loss import nll_per_example
    from starflow_jax.model import StarFlow

    cfg = model_config(load_config(ROOT / "configs" / "video_tiny_cpu.py", ["model.channels=32"]))
    model = StarFlow(cfg, rngs=nnx.Rngs(3))
    x = np.random.default_rng(0).uniform(-1, 1, (3, 4, 1, 8, 8)).astype(np.float32)
    y = one_hot_labels(np.array([1, 4, 7]), cfg.txt_dim - 1)

    def prefix(k):
        out = model(x[:, :k], y)
        return np.asarray(nll_per_example(out.z, out.logdets))

    want = np.asarray(model.nll_per_frame(model(x, y)))
    np.testing.assert_allclose(prefix_frame_nll(prefix, 4), want, rtol=1e-4, atol=1e-5)
