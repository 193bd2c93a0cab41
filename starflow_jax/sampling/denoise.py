"""Denoising after sampling: the flow was trained on noise-augmented data
(``x + noise_std * eps``), so its samples carry that noise; one step removes it.

* ``score_denoise``: Tweedie's step with the flow's own score,
  ``x - sigma^2 * grad_x NLL(x)`` (``NLL`` the total negative log-likelihood of each
  example in nats; reverse-mode ``jax.grad``), the reference's ``self_denoise``.
* ``learned_denoise``: the learnable denoiser's prediction of the (scaled) score,
  ``x - 0.3 * pred * (sigma - sigma_next) / sigma``, the reference's ``apply_denoising``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from starflow_jax.flow.loss import nll_per_example
from starflow_jax.model.starflow import StarFlow

# The reference scales the denoiser's regression target by noise_std / 0.3 at training time.
DENOISER_NOISE_CONST = 0.3


@nnx.jit
def flow_score(model: StarFlow, x: jax.Array, y: jax.Array | None = None) -> jax.Array:
    """``grad_x`` of each example's total NLL (nats), by reverse-mode autodiff."""
    dims = math.prod(x.shape[1:])

    def total_nll(model, x):
        out = model(x, y)
        return jnp.sum(nll_per_example(out.z, out.logdets)) * dims

    return nnx.grad(total_nll, argnums=1)(model, x.astype(jnp.float32))


def score_denoise(
    model: StarFlow, x: jax.Array, y: jax.Array | None = None, *, noise_std: float, step_size: float = 1.0
) -> jax.Array:
    """One step ``x - step_size * noise_std^2 * grad_x NLL(x)``."""
    if noise_std <= 0:
        return x
    return x - (noise_std**2 * step_size) * flow_score(model, x, y)


@nnx.jit
def _denoiser(model: StarFlow, x, y):
    return model.denoise(x, y)


def learned_denoise(
    model: StarFlow, x: jax.Array, y: jax.Array | None = None, *, noise_std: float, sigma_next: float = 0.0
) -> jax.Array:
    """The learnable denoiser's step from noise level ``noise_std`` to ``sigma_next``."""
    if noise_std <= 0:
        return x
    pred = _denoiser(model, x.astype(jnp.float32), y)
    return x - pred * DENOISER_NOISE_CONST * (noise_std - sigma_next) / noise_std


def denoise(
    model: StarFlow, x: jax.Array, y: jax.Array | None = None, *, noise_std: float, use_learned: bool | None = None
) -> jax.Array:
    """The reference's choice: the learnable denoiser when the model has one (unless
    ``use_learned=False``), else the score step."""
    if use_learned is None:
        use_learned = model.learnable_self_denoiser is not None
    if use_learned:
        return learned_denoise(model, x, y, noise_std=noise_std)
    return score_denoise(model, x, y, noise_std=noise_std)


def denoise_video(
    model: StarFlow,
    x: jax.Array,
    y: jax.Array | None = None,
    *,
    noise_std: float,
    window: int | None = None,
    use_learned: bool | None = None,
) -> jax.Array:
    """``denoise`` over a video ``(b, t, c, H, W)`` in windows of ``window`` frames (the
    attention window used for sampling; default: the whole video), the reference's
    overlap rule: the first window is denoised whole; each later window starts
    ``window - overlap`` frames further on, reads the frames already denoised before it
    as context, and writes only its frames after the first ``overlap``
    (``overlap = denoiser_window`` if the model sets one, else ``window - 1``: one new
    frame per window)."""
    if x.ndim != 5:
        raise ValueError(f"denoise_video needs a video (b, t, c, H, W), got shape {tuple(x.shape)}")
    t = x.shape[1]
    steps = t if window is None else int(window)
    if steps < 1:
        raise ValueError(f"the denoising window must hold at least one frame, got {steps}")
    dw = model.cfg.denoiser_window
    overlap_next = steps - 1 if dw is None else int(dw)
    if window is not None and steps < t and not 0 <= overlap_next < steps:
        raise ValueError(f"denoiser_window={dw} must be smaller than the {steps}-frame denoising window")
    start, overlap = 0, 0
    while start < t and start + overlap < min(t, start + steps):
        out = denoise(model, x[:, start : start + steps], y, noise_std=noise_std, use_learned=use_learned)
        x = x.at[:, start + overlap : start + steps].set(out[:, overlap:])
        overlap = overlap_next
        start += steps - overlap
    return x
