"""Decoder fine-tuning as pure functions: the state (trainable VAE parameters, discriminator
parameters, two AdamW states, LeCam EMAs, step, key), one jitted step, the held-out
noisy-latent reconstruction error.

Per step, in the reference's order (``finetune_decoder.py``): the frozen encoder's latents
``z1 = posterior sample * scaling_factor`` (minus ``shift_factor`` first, 0 for the SD-VAE),
``z = z1 + noise_std * N(0, 1)``, ``x_fake = decode(z)``; one AdamW step of the decoder
(with ``post_quant_conv``: every VAE parameter the reference's loss reaches; encoder and
``quant_conv`` run without gradients, so its AdamW leaves them alone) on the generator loss
of ``(x, x_fake)`` mapped to [0, 1]; then one AdamW step of the discriminator on the same
``x_fake`` (computed before the decoder's update) with the LeCam EMAs from before the step.
Both schedules step after their optimizer (``lr_schedule`` offset 0). The reference's AMP
path (loss_scaling = 1, its default) steps the discriminator's optimizer; its non-AMP path
steps the decoder's optimizer a second time instead, which we take for a slip and do not
follow.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from starflow_jax.autoencoders.finetune.convnext import convnext_distance
from starflow_jax.autoencoders.finetune.discriminator import PatchDiscriminator
from starflow_jax.autoencoders.finetune.losses import (
    LeCamState,
    discriminator_factor,
    discriminator_loss,
    generator_terms,
    init_lecam_state,
    perceptual_loss,
    reconstruction_loss,
)
from starflow_jax.autoencoders.vae import AutoencoderKL, decode_latents, encode_latents
from starflow_jax.train.optimizer import lr_schedule

__all__ = [
    "FinetuneState",
    "Finetuner",
    "TRAINABLE",
    "psnr",
]

TRAINABLE = ("decoder", "post_quant_conv")  # the VAE modules the generator loss trains


def _trainable(path, _value) -> bool:
    return bool(path) and str(path[0]) in TRAINABLE


class FinetuneState(NamedTuple):
    decoder: Any  # nnx.State of the trainable VAE parameters
    discriminator: Any  # nnx.State of the discriminator's parameters
    opt_decoder: Any
    opt_discriminator: Any
    lecam: LeCamState
    step: jax.Array
    key: jax.Array


def psnr(real01: jax.Array, fake01: jax.Array) -> jax.Array:
    """PSNR in dB of images in [0, 1] (reconstructions clipped to [0, 1]), over the batch."""
    mse = jnp.mean(jnp.square(real01 - jnp.clip(fake01, 0.0, 1.0)))
    return -10.0 * jnp.log10(jnp.maximum(mse, 1e-12))


class Finetuner:
    """The fine-tuning of ``vae``'s decoder with the settings ``finetune`` (config/finetune.py)
    and ``loss`` (config/decoder_loss.py). ``lpips`` / ``convnext``: the perceptual networks
    (None: no perceptual term; both or neither). ``steps_per_epoch``: the discriminator's
    warmup when ``discriminator_warmup_steps`` is -1."""

    def __init__(self, vae: AutoencoderKL, finetune, loss, *, steps_per_epoch: int, lpips=None, convnext=None):
        if (lpips is None) != (convnext is None):
            raise ValueError("the perceptual term needs both LPIPS and ConvNeXt-S (or neither)")
        self.f, self.loss = finetune, loss
        self.lpips, self.convnext = lpips, convnext
        self.graphdef, self.trainable0, self.frozen = nnx.split(vae, _trainable, ...)
        self.scaling, self.shift = vae.cfg.scaling_factor, vae.cfg.shift_factor or 0.0
        disc = PatchDiscriminator(
            vae.cfg.out_channels,
            loss.discriminator_channels,
            loss.discriminator_stages,
            loss.discriminator_blur,
            rngs=nnx.Rngs(finetune.seed),
        )
        self.disc_graphdef, self.disc0 = nnx.split(disc)
        total = int(finetune.steps)
        d_warm = int(finetune.discriminator_warmup_steps)
        d_warm = steps_per_epoch if d_warm < 0 else d_warm
        self.lr_decoder = lr_schedule(finetune.lr, finetune.min_lr, finetune.warmup_steps, total)
        self.lr_discriminator = lr_schedule(finetune.discriminator_lr, finetune.min_lr, d_warm, total)
        kw = dict(b1=finetune.b1, b2=finetune.b2, weight_decay=finetune.weight_decay)
        self.tx_decoder = optax.adamw(self.lr_decoder, **kw)
        self.tx_discriminator = optax.adamw(self.lr_discriminator, **kw)
        self.step = jax.jit(self._step, donate_argnums=0)
        self.heldout_error = jax.jit(self._heldout_error)

    def init(self) -> FinetuneState:
        return FinetuneState(
            decoder=self.trainable0,
            discriminator=self.disc0,
            opt_decoder=self.tx_decoder.init(self.trainable0),
            opt_discriminator=self.tx_discriminator.init(self.disc0),
            lecam=init_lecam_state(),
            step=jnp.zeros((), jnp.int32),
            key=jax.random.key(int(self.f.seed)),
        )

    def vae(self, state: FinetuneState) -> AutoencoderKL:
        return nnx.merge(self.graphdef, state.decoder, self.frozen)

    def noisy_latents(self, trainable, images: jax.Array, key: jax.Array) -> jax.Array:
        """The frozen encoder's scaled posterior sample plus ``noise_std`` Gaussian noise."""
        k_post, k_noise = jax.random.split(key)
        vae = nnx.merge(self.graphdef, trainable, self.frozen)
        z1 = jax.lax.stop_gradient(encode_latents(vae, images, k_post))
        return z1 + self.f.noise_std * jax.random.normal(k_noise, z1.shape, z1.dtype)

    def _decode(self, trainable, z):
        return decode_latents(nnx.merge(self.graphdef, trainable, self.frozen), z)

    def _generator(self, trainable, disc_state, real01, z, step):
        fake01 = self._decode(trainable, z) * 0.5 + 0.5
        s = self.loss
        recon = reconstruction_loss(real01, fake01, s)
        if self.lpips is not None:
            perceptual = perceptual_loss(
                self.lpips(real01, fake01), convnext_distance(self.convnext, real01, fake01), s
            )
        else:
            perceptual = jnp.zeros((), jnp.float32)
        factor = discriminator_factor(step, s)
        use_gan = s.discriminator_factor > 0 and s.discriminator_weight > 0
        fake_logits = nnx.merge(self.disc_graphdef, disc_state)(fake01) if use_gan else None
        total, terms = generator_terms(recon, perceptual, fake_logits, 0.0, factor, s)
        return total, (terms, fake01)

    def _step(self, state: FinetuneState, images: jax.Array) -> tuple[FinetuneState, dict]:
        key, k_step = jax.random.split(state.key)
        z = self.noisy_latents(state.decoder, images, k_step)
        real01 = images.astype(jnp.float32) * 0.5 + 0.5
        grads, (terms, fake01) = jax.grad(self._generator, has_aux=True)(
            state.decoder, state.discriminator, real01, z, state.step
        )
        updates, opt_decoder = self.tx_decoder.update(grads, state.opt_decoder, state.decoder)
        decoder = optax.apply_updates(state.decoder, updates)

        def d_loss(disc_state):
            disc = nnx.merge(self.disc_graphdef, disc_state)
            loss, d_terms, lecam = discriminator_loss(
                real01, fake01, discriminator=disc, lecam_state=state.lecam, step=state.step, settings=self.loss
            )
            return loss, (d_terms, lecam)

        d_grads, (d_terms, lecam) = jax.grad(d_loss, has_aux=True)(state.discriminator)
        d_updates, opt_discriminator = self.tx_discriminator.update(
            d_grads, state.opt_discriminator, state.discriminator
        )
        discriminator = optax.apply_updates(state.discriminator, d_updates)
        metrics = {k: v for k, v in {**terms, **d_terms}.items() if "weight" not in k}
        metrics["psnr"] = psnr(real01, fake01)
        metrics["lr"] = self.lr_decoder(state.step)
        new = FinetuneState(decoder, discriminator, opt_decoder, opt_discriminator, lecam, state.step + 1, key)
        return new, metrics

    def _heldout_error(self, trainable, images: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(mse, psnr)`` in [0, 1] units of the reconstructions of ``images`` from noisy
        latents drawn with ``key`` (the same key each time: comparable across steps)."""
        z = self.noisy_latents(trainable, images, key)
        real01 = images.astype(jnp.float32) * 0.5 + 0.5
        fake01 = self._decode(trainable, z) * 0.5 + 0.5
        return jnp.mean(jnp.square(real01 - fake01)), psnr(real01, fake01)
