"""The train state and the pure train step (jit it with explicit shardings)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from starflow_jax.flow.labels import one_hot_labels
from starflow_jax.flow.loss import nll_per_example
from starflow_jax.flow.noise import add_noise, apply_noise, draw_noise
from starflow_jax.train import objective
from starflow_jax.train.optimizer import DENOISER, FLOW, param_labels


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
    remat: bool | str = False  # a policy of layers.transformer.REMAT_POLICIES (or true/false)
    grad_accum: int = 1  # micro-batches per update (the batch is split along its first axis)
    cond_noise_level: bool = False  # weight the loss by noise_std / 0.3 (the reference's option)
    denoiser: bool = False  # train the learnable denoiser by flow-score matching


def init_state(model: nnx.Module, tx: optax.GradientTransformation, seed: int, ema: bool) -> TrainState:
    params = nnx.state(model, nnx.Param)
    return TrainState(
        step=jnp.int32(0),
        params=params,
        opt_state=tx.init(params),
        ema=jax.tree.map(jnp.copy, params) if ema else None,
        skipped=jnp.int32(0),
        rng=jax.random.key_data(jax.random.key(seed)),
    )


def conditioning(batch: dict, labels, hp: StepConfig):
    if hp.num_classes > 0:
        return one_hot_labels(labels, hp.num_classes)
    return batch.get("cond")


def step_key(rng, step) -> jax.Array:
    """The key of update ``step`` of a state whose ``rng`` is ``rng`` (key data): its draws
    (``step_draws``) come from it."""
    return jax.random.fold_in(jax.random.wrap_key_data(rng), step)


def step_draws(key, batch: dict, hp: StepConfig, *, split_key: bool = True) -> dict:
    """The random draws of one (micro-)batch's update from ``key``: ``noise``, the image's
    shape (``flow.noise.draw_noise``: standard normal or uniform), and ``drop``, which
    examples lose their label or caption (``(b,)`` booleans; ``None`` when nothing can be
    dropped). ``bench train --trajectory`` hands the same draws to the reference."""
    if split_key:
        k_noise, k_drop = jax.random.split(key)
    else:
        k_noise, k_drop = jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)
    image = batch["image"]
    draws = dict(noise=draw_noise(k_noise, image.shape, jnp.float32, hp.noise_type), drop=None)
    labelled = batch.get("label") is not None and hp.num_classes > 0
    captioned = hp.num_classes == 0 and batch.get("cond") is not None
    if hp.drop_label > 0 and (labelled or captioned):
        draws["drop"] = objective.drop_draw(k_drop, image.shape[0], hp.drop_label)
    return draws


def step_inputs(batch: dict, draws: dict, hp: StepConfig):
    """``(x, y)``: the noisy input and the conditioning (labels or captions dropped) that a
    batch's update trains on, given its draws (``step_draws``)."""
    x = apply_noise(batch["image"].astype(jnp.float32), draws["noise"], hp.noise_std, hp.noise_type, hp.levels)
    labels = batch.get("label")
    if labels is not None and hp.num_classes > 0 and draws["drop"] is not None:
        labels = objective.apply_label_drop(labels, draws["drop"])
    y = conditioning(batch, labels, hp)
    if hp.num_classes == 0 and y is not None:
        y = y.astype(jnp.float32)
        if draws["drop"] is not None:
            y = objective.apply_embedding_drop(y, draws["drop"])
    return x, y


def _micro_step(params, batch, key, *, graphdef, hp: StepConfig, split_key: bool):
    """Loss, denoiser loss and gradients (flow + denoiser, summed: they touch disjoint
    parameters) of one micro-batch."""
    x, y = step_inputs(batch, step_draws(key, batch, hp, split_key=split_key), hp)
    weights = hp.noise_std / 0.3 if hp.cond_noise_level else None

    def loss_fn(params, x):
        out = nnx.merge(graphdef, params)(x, y, remat=hp.remat)
        return objective.flow_loss(out, weights=weights, latent_norm_regularization=hp.latent_norm_regularization)

    if not hp.denoiser:
        loss, grads = jax.value_and_grad(loss_fn)(params, x)
        return loss, jnp.float32(0.0), grads
    loss, (grads, gx) = jax.value_and_grad(loss_fn, argnums=(0, 1))(params, x)
    # The flow's own score of the noisy input, scaled to unit size as in the reference:
    # d loss / dx * numel * noise_std (the loss is a batch mean of per-dimension NLLs).
    score = jax.lax.stop_gradient(gx) * x.size * hp.noise_std

    def denoiser_loss(params):
        pred = nnx.merge(graphdef, params).denoise(x, y, remat=hp.remat)
        return jnp.mean(jnp.square(pred.astype(jnp.float32) - score))

    den_loss, den_grads = jax.value_and_grad(denoiser_loss)(params)
    return loss, den_loss, jax.tree.map(jnp.add, grads, den_grads)


def _group_norm(grads, labels, group: str):
    leaves = [g for g, lab in zip(jax.tree.leaves(grads), jax.tree.leaves(labels)) if lab == group]
    return optax.tree.norm(leaves) if leaves else jnp.float32(0.0)


def train_step(
    state: TrainState, batch: dict, *, graphdef, tx: optax.GradientTransformation, hp: StepConfig, schedule=None
):
    """One update. A non-finite loss, gradient norm or updated parameter (or, with ``grad_skip``, a gradient
    norm over ``grad_clip`` after ``grad_skip_after`` steps; the flow's or the denoiser's)
    skips the update and counts it. With ``hp.grad_accum = k`` the batch is split into
    ``k`` micro-batches whose gradients are averaged (one update)."""
    key = step_key(state.rng, state.step)
    micro = functools.partial(_micro_step, graphdef=graphdef, hp=hp)
    k = int(hp.grad_accum)
    if k < 1:
        raise ValueError(f"grad_accum must be >= 1, got {k}")
    if k == 1:
        loss, den_loss, grads = micro(state.params, batch, key, split_key=True)
    else:
        b = batch["image"].shape[0]
        if b % k:
            raise ValueError(f"batch {b} is not divisible into grad_accum={k} micro-batches")
        # micro-batch i = rows i, i + k, i + 2k, ...: each device keeps its own rows (a batch
        # sharded along its first axis stays sharded the same way, no data movement)
        mbs = jax.tree.map(lambda a: a.reshape((b // k, k) + a.shape[1:]).swapaxes(0, 1), batch)

        def body(carry, inp):
            i, mb = inp
            l, dl, g = micro(state.params, mb, jax.random.fold_in(key, i), split_key=False)
            return jax.tree.map(jnp.add, carry, (l, dl, g)), None

        zero = (jnp.float32(0.0), jnp.float32(0.0), jax.tree.map(jnp.zeros_like, state.params))
        (loss, den_loss, grads), _ = jax.lax.scan(body, zero, (jnp.arange(k), mbs))
        loss, den_loss, grads = jax.tree.map(lambda a: a / k, (loss, den_loss, grads))
    labels = param_labels(state.params)
    gnorm = _group_norm(grads, labels, FLOW)
    ok = jnp.isfinite(loss) & jnp.isfinite(gnorm)
    too_big = gnorm > hp.grad_clip
    metrics = dict(loss=loss)
    if hp.denoiser:
        den_gnorm = _group_norm(grads, labels, DENOISER)
        ok = ok & jnp.isfinite(den_loss) & jnp.isfinite(den_gnorm)
        too_big = too_big | (den_gnorm > hp.grad_clip)
        metrics.update(denoiser_loss=den_loss, denoiser_grad_norm=den_gnorm)
    if hp.grad_skip and hp.grad_clip > 0:
        ok = ok & ~(too_big & (state.step > hp.grad_skip_after))
    updates, new_opt = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    # an update that overflows (a diverging run) is skipped too: the state never holds NaN / Inf
    ok = ok & jnp.all(jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(new_params)]))

    def keep(new, old):
        return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)

    params = keep(new_params, state.params)
    opt_state = keep(new_opt, state.opt_state)
    ema = state.ema
    if ema is not None:
        d = hp.ema_decay
        ema = keep(jax.tree.map(lambda e, p: d * e + (1 - d) * p, ema, params), ema)
    skipped = state.skipped + (~ok).astype(jnp.int32)
    metrics.update(grad_norm=gnorm, skipped=skipped)
    if schedule is not None:
        metrics["lr"] = schedule(state.step)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema, skipped=skipped)
    return new_state, metrics


def eval_nll(params, batch: dict, key, *, graphdef, hp: StepConfig) -> jax.Array:
    """NLL per dimension (nats) of a held-out batch under one dequantisation draw, per
    example and frame: ``(b, t)`` for video batches (``StarFlow.nll_per_frame``), ``(b, 1)``
    for images."""
    x = add_noise(key, batch["image"].astype(jnp.float32), hp.noise_std, hp.noise_type, hp.levels)
    y = conditioning(batch, batch.get("label"), hp)
    model = nnx.merge(graphdef, params)
    out = model(x, y)
    if x.ndim == 5:
        return model.nll_per_frame(out)
    return nll_per_example(out.z, out.logdets)[:, None]
