"""Training: the step's skip rule, workdir protection, the train CLI, fine-tuning (exact
resume: tests/test_resume.py)."""

import json

import jax
import numpy as np
import pytest
from fast_run import FAST, ROOT, TINY
from flax import nnx

from starflow_jax.cli.main import main
from starflow_jax.config import load_config, model_config
from starflow_jax.model import StarFlow
from starflow_jax.train import optimizer
from starflow_jax.train import step as S
from starflow_jax.train.loop import WorkdirError, train


def test_nan_batch_is_skipped_and_counted():
    config = load_config(TINY, FAST)
    model = StarFlow(model_config(config), rngs=nnx.Rngs(0))
    import optax

    sched = optax.constant_schedule(1e-3)
    tx = optimizer.adamw(sched, grad_clip=1.0)
    hp = S.StepConfig(noise_type="uniform", levels=17, num_classes=10)
    state = S.init_state(model, tx, 0, ema=True)
    step = jax.jit(lambda st, b: S.train_step(st, b, graphdef=nnx.graphdef(model), tx=tx, hp=hp, schedule=sched))
    images = np.zeros((4, 1, 8, 8), np.float32)
    images[1, 0, 3, 3] = np.nan
    batch = dict(image=images, label=np.arange(4, dtype=np.int32))
    new, m = step(state, batch)
    assert int(new.skipped) == 1 and int(new.step) == 1
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(a, b)
    good, m = step(new, dict(batch, image=np.zeros((4, 1, 8, 8), np.float32)))
    assert int(good.skipped) == 1 and np.isfinite(float(m["loss"]))
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(good.params), jax.tree.leaves(new.params)))


def test_workdir_with_another_config_is_protected(tmp_path):
    train(load_config(TINY, FAST), str(tmp_path), log=lambda *a: None, stop_after=1)
    with pytest.raises(WorkdirError, match="different config"):
        train(load_config(TINY, FAST + ["model.channels=64"]), str(tmp_path), log=lambda *a: None)
    # --overwrite discards the old run
    out = train(
        load_config(TINY, FAST + ["model.channels=64"]),
        str(tmp_path),
        overwrite=True,
        log=lambda *a: None,
        stop_after=1,
    )
    assert out["steps"] == 1


def test_train_cli(tmp_path, capsys):
    args = ["train", "--config", str(TINY), "--workdir", str(tmp_path)] + sum((["--set", o] for o in FAST), [])
    assert main(args) == 0
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["steps"] == 6 and np.isfinite(result["heldout_bpd"])
    assert "held-out bits/dim" in capsys.readouterr().out
    assert main(["train", "--config", str(ROOT / "configs" / "bench_s.py"), "--workdir", str(tmp_path / "x")]) == 2
    assert "not a training config" in capsys.readouterr().err


@pytest.mark.slow
def test_short_digits_run_beats_a_full_covariance_gaussian(tmp_path):
    config = load_config(
        TINY,
        [
            "train.steps=300",
            "train.eval_every=0",
            "train.log_every=100",
            "train.checkpoint_every=300",
            "sample.per_class=1",
        ],
    )
    result = train(config, str(tmp_path), log=lambda *a: None)
    assert 2.9 < result["gaussian_full_cov_bpd"] < 3.0 and 3.3 < result["gaussian_diag_bpd"] < 3.45
    assert result["heldout_bpd"] < result["gaussian_full_cov_bpd"]


def test_fine_tune_from_another_workdir(tmp_path):
    """A fresh run initialised from another run's checkpoint (or an imported workdir) starts
    from its parameters with a new optimizer: at learning rate 0 they stay exactly those."""
    from starflow_jax.workdir.params import load_params

    base = load_config(TINY, FAST + ["train.steps=2", "train.checkpoint_every=2"])
    train(base, str(tmp_path / "a"), log=lambda *a: None)
    tune = load_config(TINY, FAST + ["train.steps=1", "train.lr=0.0", "train.min_lr=0.0", "train.checkpoint_every=1"])
    logs = []
    train(tune, str(tmp_path / "b"), log=logs.append, init_from=str(tmp_path / "a"))
    assert any("initialised the parameters from" in line for line in logs)
    _, _, pa = load_params(tmp_path / "a")
    _, _, pb = load_params(tmp_path / "b")
    for a, b in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    other = load_config(TINY, FAST + ["model.channels=64", "train.steps=1"])
    with pytest.raises(WorkdirError, match="its model differs: channels: 32 there, 64 here"):
        train(other, str(tmp_path / "c"), log=lambda *a: None, init_from=str(tmp_path / "a"))
