"""The ``train`` section of a training config: every key declared once, with its default,
and the checks that run before a run touches its workdir.

A config file builds its section with ``train_section(steps=..., lr=...)``, naming only
what differs from these defaults; an unknown key is an error, so every key here can be
overridden with ``--set train.KEY=VALUE``.
"""
from __future__ import annotations

import ml_collections

from starflow_jax.config.model_config import ConfigError

TRAIN_DEFAULTS = dict(
    steps=1000,  # optimizer updates in the run (extend a finished run by raising it)
    batch_size=64,  # global batch, over all processes and devices
    lr=1e-3,  # peak learning rate (AdamW), reached after warmup_steps
    min_lr=1e-5,  # end of the cosine decay
    warmup_steps=100,  # linear warmup from 0
    b1=0.9,  # Adam beta1
    b2=0.95,  # Adam beta2
    weight_decay=1e-4,  # decoupled weight decay (not on norms, biases, embeddings)
    grad_clip=1.0,  # global gradient norm clip (0: none)
    grad_skip=False,  # the reference's skip rule: skip updates whose gradient norm exceeds grad_clip
    noise_type="gaussian",  # 'gaussian' (noise augmentation, latents) or 'uniform' (dequantisation, pixels)
    noise_std=0.3,  # standard deviation of the Gaussian noise augmentation
    levels=256,  # grey levels of discrete data (uniform dequantisation, bits per dimension)
    drop_label=0.1,  # probability of dropping the label / caption (classifier-free guidance)
    drop_image=0.0,  # video: probability of dropping the first frame's conditioning (the reference's drop_image)
    latent_norm_regularization=0.0,  # weight of the latent-norm penalty
    ema_decay=0.0,  # EMA of the parameters (0: no EMA kept)
    remat="none",  # rematerialisation policy: none, full, dots, dots_all, proj, offload
    grad_accum=1,  # micro-batches per update
    cond_noise_level=False,  # weight the loss by noise_std / 0.3 (the reference's option)
    denoiser_lr=1e-4,  # learnable denoiser: its own peak learning rate
    denoiser_min_lr=1e-6,  # learnable denoiser: end of its cosine decay
    seed=0,  # parameters, data order, noise and label drops
    log_every=100,  # steps between console / metrics.jsonl rows
    eval_every=1000,  # steps between held-out evaluations (0: only at the end)
    checkpoint_every=1000,  # steps between checkpoints (one is always written at the end)
    keep_checkpoints=3,  # checkpoints kept (>= 1; older ones are deleted)
    max_consecutive_skips=50,  # stop the run after this many skipped updates in a row (NaN loss, divergence)
)


def train_section(**values) -> ml_collections.ConfigDict:
    """A ``config.train`` section: TRAIN_DEFAULTS with ``values`` applied."""
    unknown = sorted(set(values) - set(TRAIN_DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown train config keys: {unknown} (the keys: {sorted(TRAIN_DEFAULTS)})")
    return ml_collections.ConfigDict({**TRAIN_DEFAULTS, **values})


def _int(t, key: str, low: int) -> int:
    v = t[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ConfigError(f"train.{key} must be an integer >= {low}, got {v!r}")
    return v


def _float(t, key: str, low: float, high: float | None = None) -> float:
    v = t[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not low <= v <= (float("inf") if high is None else high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ConfigError(f"train.{key} must be a number {bounds}, got {v!r}")
    return float(v)


def check_training_config(config) -> None:
    """Refuse a training config whose ``train`` values cannot run (before any file is
    written): missing keys, non-positive counts, probabilities outside [0, 1]."""
    for section in ("data", "train", "sample"):
        if section not in config:
            raise ConfigError(f"the config has no '{section}' section: it is not a training config")
    t = config.train
    missing = sorted(set(TRAIN_DEFAULTS) - set(t.keys()))
    if missing:
        raise ConfigError(f"train section lacks {missing}: build it with starflow_jax.config.train_section(...)")
    for key in ("steps", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints", "grad_accum",
                "max_consecutive_skips", "levels"):
        _int(t, key, 1)
    for key in ("warmup_steps", "eval_every", "seed"):
        _int(t, key, 0)
    for key in ("lr", "min_lr", "weight_decay", "grad_clip", "noise_std", "latent_norm_regularization",
                "denoiser_lr", "denoiser_min_lr"):
        _float(t, key, 0.0)
    for key in ("drop_label", "drop_image", "ema_decay"):
        _float(t, key, 0.0, 1.0)
    _float(t, "b1", 0.0, 1.0)
    _float(t, "b2", 0.0, 1.0)
    if t.noise_type not in ("gaussian", "uniform"):
        raise ConfigError(f"train.noise_type must be 'gaussian' or 'uniform', got {t.noise_type!r}")
    if t.batch_size % t.grad_accum:
        raise ConfigError(f"train.batch_size={t.batch_size} does not split into train.grad_accum={t.grad_accum} "
                          "micro-batches")
