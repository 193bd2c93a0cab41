"""The generator (decoder) and discriminator losses of the reference's decoder fine-tuning
(``ReconstructionLoss_Single_Stage`` of ``misc/ae_losses.py``), as pure functions.

Inputs are the reference's: real images ``(b, c, h, w)`` or videos ``(b, t, c, h, w)`` and
their reconstructions, both in [0, 1]. The weights and defaults are
``config.decoder_loss.decoder_loss_section()``'s (every value traced to the reference there).

Two layers: ``generator_terms`` / ``discriminator_terms`` combine the networks' outputs
(hand-checkable math); ``generator_loss`` / ``discriminator_loss`` run the networks (LPIPS,
ConvNeXt-S, the patch discriminator: NNX modules) and combine. Each returns the total and
a dict of terms named as the reference logs them; the discriminator's also returns the new
LeCam state (the EMAs of the mean logits, the reference's buffers, updated after the loss
is computed from the old ones). Gradients: differentiate ``generator_loss`` with respect to
the decoder only (the discriminator is a constant there, as the reference's
``requires_grad=False``); ``discriminator_loss`` stops the images' gradients itself.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from starflow_jax.autoencoders.finetune.convnext import ConvNeXt, convnext_distance
from starflow_jax.autoencoders.finetune.discriminator import PatchDiscriminator
from starflow_jax.autoencoders.finetune.lpips import LPIPS
from starflow_jax.autoencoders.finetune.wavelet import wavelet_loss
from starflow_jax.config.decoder_loss import decoder_loss_section

__all__ = [
    "LeCamState",
    "discriminator_factor",
    "discriminator_loss",
    "discriminator_terms",
    "generator_loss",
    "generator_terms",
    "hinge_discriminator_loss",
    "init_lecam_state",
    "lecam_loss",
    "perceptual_loss",
    "reconstruction_loss",
    "update_lecam_state",
]


class LeCamState(NamedTuple):
    """The EMAs of the discriminator's mean logits on real and on reconstructed images."""

    ema_real_logits_mean: jax.Array
    ema_fake_logits_mean: jax.Array


def init_lecam_state() -> LeCamState:
    """Both EMAs at 0, as the reference's buffers start."""
    return LeCamState(jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))


def _settings(settings):
    return decoder_loss_section() if settings is None else settings


def hinge_discriminator_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    """``(mean(relu(1 - real)) + mean(relu(1 + fake))) / 2``."""
    return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def lecam_loss(real_mean: jax.Array, fake_mean: jax.Array, state: LeCamState) -> jax.Array:
    """LeCam regularisation (unweighted): ``relu(real_mean - ema_fake)^2 + relu(ema_real - fake_mean)^2``."""
    return jnp.square(jax.nn.relu(real_mean - state.ema_fake_logits_mean)) + jnp.square(
        jax.nn.relu(state.ema_real_logits_mean - fake_mean)
    )


def update_lecam_state(state: LeCamState, real_mean: jax.Array, fake_mean: jax.Array, decay: float) -> LeCamState:
    """``ema * decay + mean * (1 - decay)`` for both, the means treated as constants."""
    real_mean, fake_mean = jax.lax.stop_gradient(real_mean), jax.lax.stop_gradient(fake_mean)
    return LeCamState(
        state.ema_real_logits_mean * decay + real_mean * (1.0 - decay),
        state.ema_fake_logits_mean * decay + fake_mean * (1.0 - decay),
    )


def discriminator_factor(step, settings=None) -> jax.Array:
    """``discriminator_factor`` once ``step >= discriminator_start``, else 0 (``step`` may be traced)."""
    s = _settings(settings)
    return jnp.where(jnp.asarray(step) >= s["discriminator_start"], s["discriminator_factor"], 0.0).astype(jnp.float32)


def reconstruction_loss(inputs: jax.Array, reconstructions: jax.Array, settings=None) -> jax.Array:
    """The mean squared ("l2") or absolute ("l1") error over every value, times
    ``reconstruction_weight``, divided by ``exp(logvar)``."""
    s = _settings(settings)
    diff = inputs.astype(jnp.float32) - reconstructions.astype(jnp.float32)
    if s["reconstruction"] == "l2":
        loss = jnp.mean(jnp.square(diff))
    elif s["reconstruction"] == "l1":
        loss = jnp.mean(jnp.abs(diff))
    else:
        raise ValueError(f"reconstruction must be 'l2' or 'l1', got {s['reconstruction']!r}")
    return loss * s["reconstruction_weight"] / jnp.exp(jnp.float32(s["logvar"]))


def perceptual_loss(lpips_distances: jax.Array, convnext_term: jax.Array, settings=None) -> jax.Array:
    """The reference's ``PerceptualLoss("lpips-convnext_s-W1-W2")`` averaged over the batch
    (unweighted by ``perceptual_weight``): ``mean((W1 * lpips + W2 * convnext) / (W1 + W2))``,
    ``lpips_distances`` per image ``(b,)``, ``convnext_term`` the batch's scalar."""
    s = _settings(settings)
    w1, w2 = s["lpips_weight"], s["convnext_weight"]
    return jnp.mean((w1 * lpips_distances + w2 * convnext_term) / (w1 + w2))


def generator_terms(
    reconstruction: jax.Array,
    perceptual: jax.Array,
    fake_logits: jax.Array | None,
    wavelet: jax.Array | float,
    factor: jax.Array,
    settings=None,
) -> tuple[jax.Array, dict]:
    """The generator's total from its parts: ``reconstruction`` (already weighted,
    ``reconstruction_loss``), ``perceptual`` (``perceptual_loss``), the discriminator's
    logits on the reconstructions (``None``: no GAN term), the unweighted ``wavelet`` term
    (0 for images) and ``factor`` (``discriminator_factor``)."""
    s = _settings(settings)
    gan = jnp.zeros((), jnp.float32)
    if fake_logits is not None:  # the reference computes it only while the factor is positive
        gan = jnp.where(factor > 0, -jnp.mean(fake_logits), 0.0)
    d_weight = jnp.float32(s["discriminator_weight"])
    weighted_gan = d_weight * factor * gan
    weighted_perceptual = s["perceptual_weight"] * perceptual
    weighted_wavelet = s["wavelet_weight"] * jnp.asarray(wavelet, jnp.float32)
    total = reconstruction + weighted_perceptual + weighted_gan + weighted_wavelet
    terms = dict(
        total_loss=total,
        reconstruction_loss=reconstruction,
        perceptual_loss=weighted_perceptual,
        weighted_gan_loss=weighted_gan,
        discriminator_factor=factor,
        d_weight=d_weight,
        gan_loss=gan,
        wavelet_loss=weighted_wavelet,
    )
    return total, jax.tree.map(jax.lax.stop_gradient, terms)


def _frames(x: jax.Array) -> jax.Array:
    return x.reshape((-1, *x.shape[2:])) if x.ndim == 5 else x


def _scored(discriminator, x: jax.Array) -> jax.Array:
    """What ``discriminator`` scores of ``x``: frames folded into the batch (the 2D patch
    discriminator), or whole clips (``ClipDiscriminator``, the reference's 3D one)."""
    return x if getattr(discriminator, "scores_clips", False) else _frames(x)


def generator_loss(
    inputs: jax.Array,
    reconstructions: jax.Array,
    *,
    lpips: LPIPS,
    convnext: ConvNeXt,
    discriminator: PatchDiscriminator,
    step,
    settings=None,
) -> tuple[jax.Array, dict]:
    """The reference's generator loss of real ``inputs`` and ``reconstructions`` (images
    ``(b, c, h, w)`` or videos ``(b, t, c, h, w)`` in [0, 1]; videos: the perceptual terms and
    the discriminator per frame, the wavelet term over (t, h, w)); ``(total, terms)``, terms
    also holding the unweighted ``lpips`` (batch mean) and ``convnext`` terms."""
    s = _settings(settings)
    if inputs.shape != reconstructions.shape or inputs.ndim not in (4, 5):
        raise ValueError(
            f"inputs and reconstructions must be (b, c, h, w) or (b, t, c, h, w) of one shape, got "
            f"{tuple(inputs.shape)} and {tuple(reconstructions.shape)}"
        )
    inputs, reconstructions = inputs.astype(jnp.float32), reconstructions.astype(jnp.float32)
    reconstruction = reconstruction_loss(inputs, reconstructions, s)
    wavelet = wavelet_loss(inputs, reconstructions) if inputs.ndim == 5 else 0.0
    frames, recon_frames = _frames(inputs), _frames(reconstructions)
    lpips_distances = lpips(frames, recon_frames)
    convnext_term = convnext_distance(convnext, frames, recon_frames)
    perceptual = perceptual_loss(lpips_distances, convnext_term, s)
    factor = discriminator_factor(step, s)
    use_gan = s["discriminator_factor"] > 0 and s["discriminator_weight"] > 0
    fake_logits = discriminator(_scored(discriminator, reconstructions)) if use_gan else None
    total, terms = generator_terms(reconstruction, perceptual, fake_logits, wavelet, factor, s)
    terms["lpips"] = jax.lax.stop_gradient(jnp.mean(lpips_distances))
    terms["convnext"] = jax.lax.stop_gradient(convnext_term)
    return total, terms


def discriminator_terms(
    logits_real: jax.Array, logits_fake: jax.Array, lecam_state: LeCamState, factor: jax.Array, settings=None
) -> tuple[jax.Array, dict, LeCamState]:
    """``factor * hinge + lecam_weight * LeCam`` from the discriminator's logits (LeCam from
    the old EMAs, applied whatever the factor, as the reference does); the terms and the
    updated EMAs (unchanged when ``lecam_weight`` is 0: the reference keeps none then)."""
    s = _settings(settings)
    loss = factor * hinge_discriminator_loss(logits_real, logits_fake)
    real_mean, fake_mean = jnp.mean(logits_real), jnp.mean(logits_fake)
    lecam = jnp.zeros((), jnp.float32)
    new_state = lecam_state
    if s["lecam_weight"] > 0:
        lecam = lecam_loss(real_mean, fake_mean, lecam_state) * s["lecam_weight"]
        new_state = update_lecam_state(lecam_state, real_mean, fake_mean, s["lecam_ema_decay"])
    loss = loss + lecam
    terms = dict(discriminator_loss=loss, logits_real=real_mean, logits_fake=fake_mean, lecam_loss=lecam)
    return loss, jax.tree.map(jax.lax.stop_gradient, terms), new_state


def discriminator_loss(
    inputs: jax.Array,
    reconstructions: jax.Array,
    *,
    discriminator: PatchDiscriminator,
    lecam_state: LeCamState,
    step,
    settings=None,
) -> tuple[jax.Array, dict, LeCamState]:
    """The reference's discriminator loss on real ``inputs`` and ``reconstructions`` (both
    as in ``generator_loss``, their gradients stopped): ``(total, terms, new LeCam state)``."""
    s = _settings(settings)
    if inputs.shape != reconstructions.shape:
        raise ValueError(
            f"inputs and reconstructions must have one shape, got {tuple(inputs.shape)} and "
            f"{tuple(reconstructions.shape)}"
        )
    real = jax.lax.stop_gradient(_scored(discriminator, inputs).astype(jnp.float32))
    fake = jax.lax.stop_gradient(_scored(discriminator, reconstructions).astype(jnp.float32))
    logits_real, logits_fake = jnp.split(discriminator(jnp.concatenate([real, fake])), 2)
    return discriminator_terms(logits_real, logits_fake, lecam_state, discriminator_factor(step, s), s)
