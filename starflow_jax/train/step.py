"""The train state and the pure train step (jit it with explicit shardings)."""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from starflow_jax.train import objective


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    ema: Any
    skipped: jax.Array
    rng: jax.Array


@dataclasses.dataclass(frozen=True)
class StepConfig:
    noise_std: float = 0.3
    noise_type: str = "gaussian"
    levels: int = 256
    num_classes: int = 0  # > 0: class labels, one-hot with a null class
    drop_label: float = 0.0
    latent_norm_regularization: float = 0.0
    grad_clip: float = 0.0
    grad_skip: bool = False
    grad_skip_after: int = 100
    ema_decay: float = 0.0
    remat: bool = False


def init_state(model: nnx.Module, tx: optax.GradientTransformation, seed: int, ema: bool) -> TrainState:
    params = nnx.state(model, nnx.Param)
    return TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params),
                      ema=jax.tree.map(jnp.copy, params) if ema else None, skipped=jnp.int32(0),
                      rng=jax.random.key_data(jax.random.key(seed)))


def conditioning(batch: dict, labels, hp: StepConfig):
    if hp.num_classes > 0:
        return objective.one_hot_labels(labels, hp.num_classes)
    return batch.get("cond")


def train_step(state: TrainState, batch: dict, *, graphdef, tx: optax.GradientTransformation, hp: StepConfig,
               schedule=None):
    """One update. A non-finite loss or gradient norm (or, with ``grad_skip``, a gradient
    norm over ``grad_clip`` after ``grad_skip_after`` steps) skips the update and counts it."""
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    k_noise, k_drop = jax.random.split(key)
    x = objective.add_noise(k_noise, batch["image"].astype(jnp.float32), hp.noise_std, hp.noise_type, hp.levels)
    labels = batch.get("label")
    if labels is not None and hp.num_classes > 0:
        labels = objective.drop_labels(k_drop, labels, hp.drop_label)
    y = conditioning(batch, labels, hp)

    def loss_fn(params):
        out = nnx.merge(graphdef, params)(x, y, remat=hp.remat)
        return objective.flow_loss(out, latent_norm_regularization=hp.latent_norm_regularization)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    gnorm = optax.tree.norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(gnorm)
    if hp.grad_skip and hp.grad_clip > 0:
        ok = ok & ~((gnorm > hp.grad_clip) & (state.step > hp.grad_skip_after))
    updates, new_opt = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    params = keep(new_params, state.params)
    opt_state = keep(new_opt, state.opt_state)
    ema = state.ema
    if ema is not None:
        d = hp.ema_decay
        ema = keep(jax.tree.map(lambda e, p: d * e + (1 - d) * p, ema, params), ema)
    skipped = state.skipped + (~ok).astype(jnp.int32)
    metrics = dict(loss=loss, grad_norm=gnorm, skipped=skipped)
    if schedule is not None:
        metrics["lr"] = schedule(state.step)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema,
                              skipped=skipped)
    return new_state, metrics


def eval_nll(params, batch: dict, key, *, graphdef, hp: StepConfig) -> jax.Array:
    """Per-example NLL per dimension (nats) of a held-out batch under one dequantisation draw."""
    from starflow_jax.flow.loss import nll_per_example

    x = objective.add_noise(key, batch["image"].astype(jnp.float32), hp.noise_std, hp.noise_type, hp.levels)
    y = conditioning(batch, batch.get("label"), hp)
    out = nnx.merge(graphdef, params)(x, y)
    return nll_per_example(out.z, out.logdets)
