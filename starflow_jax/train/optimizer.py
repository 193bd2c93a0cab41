"""AdamW with the reference's defaults and a linear-warmup, cosine-decay schedule."""
from __future__ import annotations

import optax


def lr_schedule(lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> optax.Schedule:
    warmup_steps = max(int(warmup_steps), 1)
    decay = max(int(total_steps) - warmup_steps, 1)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warmup_steps),
         optax.cosine_decay_schedule(lr, decay, alpha=min_lr / lr if lr > 0 else 0.0)],
        boundaries=[warmup_steps])


def adamw(schedule, *, b1: float = 0.9, b2: float = 0.95, weight_decay: float = 1e-4,
          grad_clip: float = 0.0) -> optax.GradientTransformation:
    parts = []
    if grad_clip > 0:
        parts.append(optax.clip_by_global_norm(grad_clip))
    parts.append(optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay))
    return optax.chain(*parts)
