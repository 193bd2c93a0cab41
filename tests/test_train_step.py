"""The train step's options: gradient accumulation, rematerialisation policies, the
noise-level loss weight, and the learnable denoiser trained by flow-score matching."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import reference_case
from flax import nnx

from starflow_jax.config import load_config, model_config
from starflow_jax.interop import reference_cases as rc
from starflow_jax.model import StarFlow
from starflow_jax.sampling.denoise import flow_score
from starflow_jax.train import optimizer
from starflow_jax.train import step as S

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny_cpu.py"


def _tiny():
    config = load_config(TINY, ["model.channels=32", "model.layers_per_block=[1, 0, 2]"])
    model = StarFlow(model_config(config), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    batch = dict(
        image=rng.uniform(-1, 1, (8, 1, 8, 8)).astype(np.float32), label=rng.integers(0, 10, 8).astype(np.int32)
    )
    return model, batch


def _run(model, batch, hp, tx=None):
    tx = tx or optimizer.adamw(optax.constant_schedule(1e-3), grad_clip=1.0)
    state = S.init_state(model, tx, 0, ema=False)
    return jax.jit(lambda st, b: S.train_step(st, b, graphdef=nnx.graphdef(model), tx=tx, hp=hp))(state, batch)


def _close(a, b, rtol=1e-5, atol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def test_gradient_accumulation_equals_the_full_batch():
    """Without randomness in the objective (no noise, no label dropout), averaging the
    gradients of 2 or 4 micro-batches is the full batch's gradient: same update."""
    model, batch = _tiny()
    hp = S.StepConfig(noise_std=0.0, noise_type="gaussian", num_classes=10, grad_clip=1.0)
    full, m_full = _run(model, batch, hp)
    for k in (2,):
        acc, m_acc = _run(model, batch, S.StepConfig(**{**hp.__dict__, "grad_accum": k}))
        np.testing.assert_allclose(float(m_acc["loss"]), float(m_full["loss"]), rtol=1e-6)
        np.testing.assert_allclose(float(m_acc["grad_norm"]), float(m_full["grad_norm"]), rtol=1e-5)
        _close(acc.params, full.params)
    with pytest.raises(ValueError, match="not divisible into grad_accum=3"):
        _run(model, batch, S.StepConfig(**{**hp.__dict__, "grad_accum": 3}))


def test_remat_policies_give_the_same_step():
    model, batch = _tiny()
    hp = S.StepConfig(noise_type="uniform", levels=17, num_classes=10, drop_label=0.1)
    ref, m_ref = _run(model, batch, hp)
    for policy in ("full", "proj", "offload"):
        out, m = _run(model, batch, S.StepConfig(**{**hp.__dict__, "remat": policy}))
        np.testing.assert_allclose(float(m["loss"]), float(m_ref["loss"]), rtol=1e-6)
        _close(out.params, ref.params)


def test_unknown_remat_policy():
    model, batch = _tiny()
    with pytest.raises(ValueError, match="remat policy 'sometimes' unknown"):
        _run(model, batch, S.StepConfig(num_classes=10, remat="sometimes"))


def test_cond_noise_level_weights_the_loss():
    """The reference's cond_noise_level option weights the loss by noise_std / 0.3."""
    model, batch = _tiny()
    hp = S.StepConfig(noise_std=0.6, num_classes=10)
    _, plain = _run(model, batch, hp)
    _, weighted = _run(model, batch, S.StepConfig(**{**hp.__dict__, "cond_noise_level": True}))
    np.testing.assert_allclose(float(weighted["loss"]), 2.0 * float(plain["loss"]), rtol=1e-6)


@pytest.mark.slow
def test_denoiser_learns_the_flow_score_and_leaves_the_flow_alone():
    """With a learnable denoiser: its loss is the MSE to noise_std * grad_x NLL (the flow's
    score of the noisy input); only the denoiser's parameters move by its optimizer, and
    the flow's update equals a run without the denoiser."""
    case = reference_case("video_small")
    model, _ = rc.build_model(case)
    x0, y = np.asarray(case.arrays["input/x"]), np.asarray(case.arrays["input/y"])
    batch = dict(image=x0, cond=y)
    sigma = 0.3
    hp = S.StepConfig(noise_std=sigma, grad_clip=1.0, denoiser=True)
    flow_tx = optimizer.adamw(optax.constant_schedule(1e-3), grad_clip=1.0)
    tx = optimizer.flow_and_denoiser(flow_tx, optax.constant_schedule(1e-4), grad_clip=1.0)
    new, m = _run(model, batch, hp, tx)

    key = jax.random.fold_in(jax.random.key(0), 0)
    k_noise, _ = jax.random.split(key)
    x = jnp.asarray(x0) + sigma * jax.random.normal(k_noise, x0.shape)
    target = sigma * flow_score(model, x, jnp.asarray(y))
    expected = float(jnp.mean((model.denoise(x, jnp.asarray(y)) - target) ** 2))
    np.testing.assert_allclose(float(m["denoiser_loss"]), expected, rtol=1e-4)
    assert float(m["denoiser_grad_norm"]) > 0

    plain, _ = _run(model, batch, S.StepConfig(noise_std=sigma, grad_clip=1.0), flow_tx)
    labels = optimizer.param_labels(new.params)
    old = nnx.state(model, nnx.Param)
    moved = {lab: [] for lab in ("flow", "denoiser")}
    for a, b, p, lab in zip(
        jax.tree.leaves(new.params), jax.tree.leaves(plain.params), jax.tree.leaves(old), jax.tree.leaves(labels)
    ):
        if lab == "flow":
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
        moved[lab].append(float(np.max(np.abs(np.asarray(a) - np.asarray(p)))))
    assert max(moved["denoiser"]) > 0 and max(moved["flow"]) > 0
    # the denoiser's AdamW steps by about its learning rate (1e-4), not the flow's (1e-3)
    assert max(moved["denoiser"]) < 3e-4


def test_caption_dropout_zeroes_the_text_embeddings():
    """For precomputed text embeddings (no class labels), drop_label drops whole captions
    to the zero (null) embedding."""
    from starflow_jax.train.objective import drop_embeddings

    y = jnp.ones((64, 3, 5))
    out = np.asarray(drop_embeddings(jax.random.key(0), y, 0.5))
    rows = out.reshape(64, -1)
    assert set(np.unique(rows.min(1))) == {0.0, 1.0} and np.all(rows.min(1) == rows.max(1))
    assert 16 < int((rows[:, 0] == 0).sum()) < 48
    np.testing.assert_array_equal(np.asarray(drop_embeddings(jax.random.key(0), y, 0.0)), np.asarray(y))
