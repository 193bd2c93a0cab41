"""AdamW with the reference's defaults, PyTorch's gradient clipping and the reference's
linear-warmup, cosine-decay schedule, step for step."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from starflow_jax.tree_paths import path_names


def lr_schedule(lr: float, min_lr: float, warmup_steps: int, total_steps: int, offset: int = 0) -> optax.Schedule:
    """The learning rate of update ``step`` (0-based) as the reference's ``CosineLRSchedule``
    sets it, where ``c = step + offset`` is how many times its ``step()`` ran before the
    update (the flow's optimizer steps before its schedule does: offset 0; the learnable
    denoiser's schedule steps before its optimizer: offset 1). ``c = 0``: ``min_lr`` (what
    the schedule sets when built); ``1 <= c <= warmup_steps``: linear from
    ``min(min_lr, 1e-6)`` to ``lr`` at ``c / warmup_steps``; after: cosine from ``lr`` down to
    ``min_lr`` at ``c = total_steps``. A value below ``min_lr`` is not applied (the previous
    one, ``min_lr``, is kept), so early warmup holds ``min_lr``."""
    lr, min_lr, w, total = float(lr), float(min_lr), int(warmup_steps), int(total_steps)
    if not 0 <= min_lr <= lr:
        raise ValueError(f"the learning rates need 0 <= min_lr <= lr, got lr={lr}, min_lr={min_lr}")
    if w < 0 or total < 1:
        raise ValueError(f"warmup_steps must be >= 0 and total steps >= 1, got {w} and {total}")
    start = min(min_lr, 1e-6)

    def schedule(step):
        c = jnp.asarray(step, jnp.float32) + offset
        warm = start + c / max(w, 1) * (lr - start)
        t = (c - w) / max(total - w, 1)
        cos = min_lr + 0.5 * (1.0 + jnp.cos(jnp.pi * t)) * (lr - min_lr)
        new = jnp.clip(jnp.where(c <= w, warm, cos), min_lr, lr)
        return jnp.where(c == 0, min_lr, new)

    return schedule


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """Gradients scaled by ``min(1, max_norm / (norm + 1e-6))``, ``norm`` their global L2
    norm: PyTorch's ``clip_grad_norm_``, which the reference clips with."""

    def update(updates, state, params=None):
        del params
        coef = jnp.minimum(max_norm / (optax.tree.norm(updates) + 1e-6), 1.0)
        return jax.tree.map(lambda g: (g * coef).astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def adamw(
    schedule, *, b1: float = 0.9, b2: float = 0.95, weight_decay: float = 1e-4, grad_clip: float = 0.0
) -> optax.GradientTransformation:
    """AdamW (decay on every parameter, as the reference's single parameter group), after
    clipping the gradients' global norm to ``grad_clip`` (0: none) as PyTorch does."""
    parts = []
    if grad_clip > 0:
        parts.append(clip_by_global_norm(grad_clip))
    parts.append(optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay))
    return optax.chain(*parts)


DENOISER = "denoiser"
FLOW = "flow"


def param_labels(params):
    """``"denoiser"`` for the learnable denoiser's parameters, ``"flow"`` for the rest."""

    def label(path, _):
        names = path_names(path)
        return DENOISER if "learnable_self_denoiser" in names else FLOW

    return jax.tree_util.tree_map_with_path(label, params)


class UnzeroedGrads(NamedTuple):
    grads: object  # the gradients the previous update used (after clipping)


def unzeroed_grads(max_norm: float = 0.0) -> optax.GradientTransformation:
    """Gradients never zeroed between updates, as the reference's ``train.py`` leaves the
    learnable denoiser's: each update uses the new gradients plus those the previous update
    used, clipped in place to ``max_norm`` (0: not clipped) as ``clip_grad_norm_`` does."""

    def init(params):
        return UnzeroedGrads(jax.tree.map(jnp.zeros_like, params))

    def update(updates, state, params=None):
        del params
        total = jax.tree.map(jnp.add, state.grads, updates)
        if max_norm > 0:
            total, _ = clip_by_global_norm(max_norm).update(total, optax.EmptyState())
        return total, UnzeroedGrads(total)

    return optax.GradientTransformation(init, update)


def flow_and_denoiser(
    flow_tx: optax.GradientTransformation,
    denoiser_schedule,
    *,
    weight_decay: float = 1e-4,
    grad_clip: float = 0.0,
    accumulate_denoiser_grads: bool = False,
) -> optax.GradientTransformation:
    """The reference's two optimizers as one transformation: ``flow_tx`` for the flow and,
    for the learnable denoiser, its own AdamW (torch defaults b1 0.9, b2 0.999; lr 1e-4
    with warmup and cosine decay to 1e-6 in the reference: ``denoiser_schedule`` built with
    ``offset=1``) with its own gradient clipping. ``accumulate_denoiser_grads``: the
    reference's ``train.py`` as published, which never zeroes the denoiser's gradients
    (``unzeroed_grads``; ``train.denoiser_accumulate_grads``)."""
    if accumulate_denoiser_grads:
        den = optax.chain(
            unzeroed_grads(grad_clip), optax.adamw(denoiser_schedule, b1=0.9, b2=0.999, weight_decay=weight_decay)
        )
    else:
        den = adamw(denoiser_schedule, b1=0.9, b2=0.999, weight_decay=weight_decay, grad_clip=grad_clip)
    return optax.multi_transform({FLOW: flow_tx, DENOISER: den}, param_labels)
