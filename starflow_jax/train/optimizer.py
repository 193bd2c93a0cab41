"""AdamW with the reference's defaults and a linear-warmup, cosine-decay schedule."""

from __future__ import annotations

import optax

from starflow_jax.tree_paths import path_names


def lr_schedule(lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> optax.Schedule:
    warmup_steps = max(int(warmup_steps), 1)
    decay = max(int(total_steps) - warmup_steps, 1)
    return optax.join_schedules(
        [
            optax.linear_schedule(0.0, lr, warmup_steps),
            optax.cosine_decay_schedule(lr, decay, alpha=min_lr / lr if lr > 0 else 0.0),
        ],
        boundaries=[warmup_steps],
    )


def adamw(
    schedule, *, b1: float = 0.9, b2: float = 0.95, weight_decay: float = 1e-4, grad_clip: float = 0.0
) -> optax.GradientTransformation:
    parts = []
    if grad_clip > 0:
        parts.append(optax.clip_by_global_norm(grad_clip))
    parts.append(optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay))
    return optax.chain(*parts)


DENOISER = "denoiser"
FLOW = "flow"


def param_labels(params):
    """``"denoiser"`` for the learnable denoiser's parameters, ``"flow"`` for the rest."""
    import jax

    def label(path, _):
        names = path_names(path)
        return DENOISER if "learnable_self_denoiser" in names else FLOW

    return jax.tree_util.tree_map_with_path(label, params)


def flow_and_denoiser(
    flow_tx: optax.GradientTransformation, denoiser_schedule, *, weight_decay: float = 1e-4, grad_clip: float = 0.0
) -> optax.GradientTransformation:
    """The reference's two optimizers as one transformation: ``flow_tx`` for the flow and,
    for the learnable denoiser, its own AdamW (torch defaults b1 0.9, b2 0.999; lr 1e-4
    with warmup and cosine decay to 1e-6 in the reference) with its own gradient clipping."""
    den = adamw(denoiser_schedule, b1=0.9, b2=0.999, weight_decay=weight_decay, grad_clip=grad_clip)
    return optax.multi_transform({FLOW: flow_tx, DENOISER: den}, param_labels)
