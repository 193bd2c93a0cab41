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
follow. The discriminator's start step counts global steps (the reference passes its
per-epoch iteration, the same while ``discriminator_start`` is 0, its default). Everything is
float32 (the reference autocasts to bfloat16 on GPU).

The Wan video VAE (``AutoencoderKLWan``) as the reference's ``utils.VAE`` wraps it: videos
``(b, t, c, h, w)`` (``t = 1 + 4k``) through the encoder in one causal pass, ``z1`` the
posterior sample normalised ``(z - latents_mean) / latents_std`` (and frames after the
first times the temporal latent scale, as ``encode_video``), the same noise, then the
inverse (``decode_video``'s) and the causal decoder in one pass (equal to diffusers'
frame-by-frame decoding to rounding). The losses take the videos in [0, 1]: reconstruction
over every value, the wavelet term over (t, h, w), the perceptual terms and the (2D patch)
discriminator on the frames folded into the batch, as the reference's ``NLayerDiscriminator``
and ``PerceptualLoss`` do. One-frame clips go to the losses as images (the reference's 4-D
batches through a Wan VAE: no wavelet term). ``decoder_loss.discriminator_3d`` (the
reference's ``--use_3d_disc 1``): the ``ClipDiscriminator`` scores whole clips instead
(clips of more than one frame only).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from starflow_jax.autoencoders.finetune.convnext import convnext_distance
from starflow_jax.autoencoders.finetune.discriminator import ClipDiscriminator, PatchDiscriminator
from starflow_jax.autoencoders.finetune.losses import (
    LeCamState,
    _frames,
    _scored,
    discriminator_factor,
    discriminator_loss,
    generator_terms,
    init_lecam_state,
    perceptual_loss,
    reconstruction_loss,
)
from starflow_jax.autoencoders.finetune.wavelet import wavelet_loss
from starflow_jax.autoencoders.vae import AutoencoderKL, decode_latents, encode_latents
from starflow_jax.autoencoders.wan_vae import (
    AutoencoderKLWan,
    apply_temporal_scale,
    denormalize_latents,
    normalize_latents,
    sample_posterior,
)
from starflow_jax.parallel.mesh import make_mesh
from starflow_jax.parallel.rules import batch_sharding
from starflow_jax.train.optimizer import lr_schedule

__all__ = [
    "FinetuneState",
    "Finetuner",
    "TRAINABLE",
    "FSDP_MIN_SIZE",
    "check_finetune_mesh",
    "fsdp_shardings",
    "psnr",
]

TRAINABLE = ("decoder", "post_quant_conv")  # the VAE modules the generator loss trains (both kinds)


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


def check_finetune_mesh(mesh, batch_size: int, process_count: int = 1) -> None:
    """The global batch splits over the mesh's ``data x fsdp`` and over the processes; the
    VAE and discriminator declare no logical axes, so nothing is split over ``tensor`` (the
    weights split over ``fsdp`` by size alone: ``fsdp_shardings``)."""
    if mesh.shape["tensor"] != 1:
        raise ValueError(
            f"mesh.tensor={mesh.shape['tensor']}: finetune-decoder has no tensor parallelism (its batch splits "
            "over data x fsdp, its weights over fsdp); set mesh.tensor=1"
        )
    split = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % split:
        raise ValueError(
            f"finetune.batch_size={batch_size} is not divisible by the mesh's data x fsdp = {split}: "
            "change the batch size or the mesh section"
        )
    if batch_size % process_count:
        raise ValueError(f"finetune.batch_size={batch_size} is not divisible by the {process_count} processes")


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


FSDP_MIN_SIZE = 2**14  # arrays of fewer elements (biases, norms, small kernels) stay replicated


def fsdp_shardings(tree, mesh, min_size: int = FSDP_MIN_SIZE):
    """ZeRO-3 style shardings of ``tree`` (arrays or ``jax.ShapeDtypeStruct``s) on ``mesh``:
    an array of at least ``min_size`` elements is split over ``fsdp`` along its largest axis
    divisible by the mesh's ``fsdp`` size (the first such axis on a tie); smaller arrays,
    arrays with no such axis and every array when ``fsdp`` is 1 are replicated. The VAE,
    discriminator and perceptual networks declare no logical axes, so this size rule stands in
    for ``parallel.rules``."""
    n = mesh.shape["fsdp"]

    def one(x) -> NamedSharding:
        shape = tuple(getattr(x, "shape", np.shape(x)))
        if n == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
            return replicated(mesh)
        axes = [a for a, d in enumerate(shape) if d % n == 0]
        if not axes:
            return replicated(mesh)
        axis = max(axes, key=lambda a: (shape[a], -a))
        return NamedSharding(mesh, P(*(("fsdp" if a == axis else None) for a in range(len(shape)))))

    return jax.tree.map(one, tree)


def place(tree, shardings):
    """Every array of ``tree`` (the same on every process) as a global array with the matching
    sharding of ``shardings`` (each process puts its own devices' slices)."""

    def one(x, sh):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sh, lambda idx: x[idx])

    return jax.tree.map(one, tree, shardings)


def place_replicated(tree, mesh):
    """Every array of ``tree`` (the same on every process) as a global array replicated over ``mesh``."""
    return place(tree, jax.tree.map(lambda _: replicated(mesh), tree))


def _frozen_dict(section) -> tuple:
    return tuple(sorted((k, v) for k, v in section.to_dict().items()))


@dataclasses.dataclass(frozen=True)
class _Spec:
    """What the compiled programs depend on (hashable): graphs and settings, no weights."""

    graphdef: Any
    disc_graphdef: Any
    lpips_graphdef: Any
    convnext_graphdef: Any
    finetune: tuple
    loss: tuple
    steps_per_epoch: int
    video: bool  # a Wan video VAE (inputs (b, t, c, h, w)), else the SD-VAE (images)
    mesh: Any  # the batch split over its (data, fsdp) axes; weights and optimizer states over fsdp (fsdp_shardings)


@functools.lru_cache(maxsize=4)
def _program(spec: _Spec) -> _Program:
    """One compiled set of programs per spec: runs in one process (a resumed run, tests) share them."""
    return _Program(spec)


class _Program:
    def __init__(self, spec: _Spec):
        self.spec = spec
        f = self.f = ml_collections.ConfigDict(dict(spec.finetune))
        self.loss = ml_collections.ConfigDict(dict(spec.loss))
        total = int(f.steps)
        d_warm = int(f.discriminator_warmup_steps)
        d_warm = spec.steps_per_epoch if d_warm < 0 else d_warm
        self.lr_decoder = lr_schedule(f.lr, f.min_lr, f.warmup_steps, total)
        self.lr_discriminator = lr_schedule(f.discriminator_lr, f.min_lr, d_warm, total)
        kw = dict(b1=f.b1, b2=f.b2, weight_decay=f.weight_decay)
        self.tx_decoder = optax.adamw(self.lr_decoder, **kw)
        self.tx_discriminator = optax.adamw(self.lr_discriminator, **kw)
        # Explicit shardings: the batch split over (data, fsdp); the state, frozen weights and
        # perceptual networks by fsdp_shardings (``compiled``), metrics replicated.
        self.batch_sharding = batch_sharding(spec.mesh, 5 if spec.video else 4)
        self._compiled = {}

    def compiled(self, state_sh, frozen_sh, nets_sh):
        """``(step, heldout_error, to_host)`` jitted for these shardings (pytrees of
        NamedShardings of the state, the frozen VAE weights and the perceptual networks)."""
        leaves, treedef = jax.tree.flatten((state_sh, frozen_sh, nets_sh))
        key = (treedef, tuple(leaves))
        if key not in self._compiled:
            repl = replicated(self.spec.mesh)
            step = jax.jit(
                self._step,
                in_shardings=(state_sh, frozen_sh, nets_sh, self.batch_sharding),
                out_shardings=(state_sh, repl),
                donate_argnums=0,
            )
            heldout = jax.jit(
                self._heldout_error, in_shardings=(state_sh.decoder, frozen_sh, repl, repl), out_shardings=repl
            )
            # the whole VAE replicated (every process can read it), for ``Finetuner.vae``
            to_host = jax.jit(lambda t: t, in_shardings=((state_sh.decoder, frozen_sh),), out_shardings=repl)
            self._compiled[key] = (step, heldout, to_host)
        return self._compiled[key]

    def vae(self, trainable, frozen) -> AutoencoderKL:
        return nnx.merge(self.spec.graphdef, trainable, frozen)

    def encode(self, vae, images: jax.Array, key: jax.Array) -> jax.Array:
        """The flow's latents of ``images``: a posterior sample, scaled (SD-VAE) or
        normalised (Wan, with its temporal latent scale)."""
        if not self.spec.video:
            return encode_latents(vae, images, key)
        z = normalize_latents(vae.cfg, sample_posterior(*vae.encode(images), key))
        return apply_temporal_scale(z, vae.cfg.temporal_latent_scale)

    def decode(self, vae, z: jax.Array) -> jax.Array:
        """The flow's latents back to pixels in [-1, 1] (``encode``'s inverse, then the decoder)."""
        if not self.spec.video:
            return decode_latents(vae, z)
        z = denormalize_latents(vae.cfg, apply_temporal_scale(z, vae.cfg.temporal_latent_scale, inverse=True))
        return vae.decode(z)

    def noisy_latents(self, trainable, frozen, images: jax.Array, key: jax.Array) -> jax.Array:
        """The frozen encoder's latents plus ``noise_std`` Gaussian noise."""
        k_post, k_noise = jax.random.split(key)
        z1 = jax.lax.stop_gradient(self.encode(self.vae(trainable, frozen), images, k_post))
        return z1 + self.f.noise_std * jax.random.normal(k_noise, z1.shape, z1.dtype)

    @staticmethod
    def _loss_view(x: jax.Array) -> jax.Array:
        """One-frame clips as images (the reference's 4-D batches through a video VAE)."""
        return x[:, 0] if x.ndim == 5 and x.shape[1] == 1 else x

    def _generator(self, trainable, frozen, nets, disc_state, real01, z, step):
        fake01 = self._loss_view(self.decode(self.vae(trainable, frozen), z) * 0.5 + 0.5)
        s = self.loss
        recon = reconstruction_loss(real01, fake01, s)
        wavelet = wavelet_loss(real01, fake01) if fake01.ndim == 5 else 0.0
        real_frames, fake_frames = _frames(real01), _frames(fake01)  # videos: frames folded into the batch
        if self.spec.lpips_graphdef is not None:
            lpips = nnx.merge(self.spec.lpips_graphdef, nets[0])
            convnext = nnx.merge(self.spec.convnext_graphdef, nets[1])
            perceptual = perceptual_loss(
                lpips(real_frames, fake_frames), convnext_distance(convnext, real_frames, fake_frames), s
            )
        else:
            perceptual = jnp.zeros((), jnp.float32)
        factor = discriminator_factor(step, s)
        use_gan = s.discriminator_factor > 0 and s.discriminator_weight > 0
        disc = nnx.merge(self.spec.disc_graphdef, disc_state)
        fake_logits = disc(_scored(disc, fake01)) if use_gan else None
        total, terms = generator_terms(recon, perceptual, fake_logits, wavelet, factor, s)
        return total, (terms, fake01)

    def _step(self, state: FinetuneState, frozen, nets, images: jax.Array) -> tuple[FinetuneState, dict]:
        key, k_step = jax.random.split(state.key)
        z = self.noisy_latents(state.decoder, frozen, images, k_step)
        real01 = self._loss_view(images.astype(jnp.float32) * 0.5 + 0.5)
        grads, (terms, fake01) = jax.grad(self._generator, has_aux=True)(
            state.decoder, frozen, nets, state.discriminator, real01, z, state.step
        )
        updates, opt_decoder = self.tx_decoder.update(grads, state.opt_decoder, state.decoder)
        decoder = optax.apply_updates(state.decoder, updates)

        def d_loss(disc_state):
            disc = nnx.merge(self.spec.disc_graphdef, disc_state)
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

    def _heldout_error(self, trainable, frozen, images: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        z = self.noisy_latents(trainable, frozen, images, key)
        real01 = images.astype(jnp.float32) * 0.5 + 0.5
        fake01 = self.decode(self.vae(trainable, frozen), z) * 0.5 + 0.5
        return jnp.mean(jnp.square(real01 - fake01)), psnr(real01, fake01)


class Finetuner:
    """The fine-tuning of ``vae``'s decoder with the settings ``finetune`` (config/finetune.py)
    and ``loss`` (config/decoder_loss.py). ``lpips`` / ``convnext``: the perceptual networks
    (None: no perceptual term; both or neither). ``steps_per_epoch``: the discriminator's
    warmup when ``discriminator_warmup_steps`` is -1. The weights are arguments of the
    compiled programs (not constants in them), so Finetuners of one spec share them.
    ``mesh`` (``parallel.mesh.make_mesh``; default: this process's first device): each
    step's global batch is split over its ``(data, fsdp)`` axes; the trainable and frozen
    VAE weights, the discriminator, the perceptual networks and both AdamW states are
    sharded over ``fsdp`` ZeRO-3 style by ``fsdp_shardings`` (arrays of at least
    ``FSDP_MIN_SIZE`` elements along their largest axis divisible by the ``fsdp`` size; the
    rest replicated), and replicated over ``data``."""

    def __init__(
        self,
        vae: AutoencoderKL | AutoencoderKLWan,
        finetune,
        loss,
        *,
        steps_per_epoch: int,
        lpips=None,
        convnext=None,
        mesh=None,
    ):
        mesh = make_mesh((1, 1, 1), jax.local_devices()[:1]) if mesh is None else mesh
        self.mesh = mesh
        if (lpips is None) != (convnext is None):
            raise ValueError("the perceptual term needs both LPIPS and ConvNeXt-S (or neither)")
        self.f, self.loss = finetune, loss
        self.video = isinstance(vae, AutoencoderKLWan)
        graphdef, self.trainable0, self.frozen = nnx.split(vae, _trainable, ...)
        if loss.discriminator_3d and not self.video:
            raise ValueError(
                "decoder_loss.discriminator_3d (the 3D discriminator) scores clips: it needs a Wan video VAE"
            )
        disc = (ClipDiscriminator if loss.discriminator_3d else PatchDiscriminator)(
            vae.cfg.pixel_out_channels if self.video else vae.cfg.out_channels,
            loss.discriminator_channels,
            loss.discriminator_stages,
            loss.discriminator_blur,
            rngs=nnx.Rngs(finetune.seed),
        )
        disc_graphdef, self.disc0 = nnx.split(disc)
        nets_graphdefs = (None, None)
        self.nets = ()
        if lpips is not None:
            (lg, ls), (cg, cs) = nnx.split(lpips), nnx.split(convnext)
            nets_graphdefs, self.nets = (lg, cg), (ls, cs)
        spec = _Spec(
            graphdef,
            disc_graphdef,
            *nets_graphdefs,
            _frozen_dict(finetune),
            _frozen_dict(loss),
            int(steps_per_epoch),
            self.video,
            mesh,
        )
        self.program = _program(spec)
        self.tx_decoder, self.tx_discriminator = self.program.tx_decoder, self.program.tx_discriminator
        self.state_shardings = fsdp_shardings(jax.eval_shape(self._init), mesh)
        frozen_sh, nets_sh = fsdp_shardings((self.frozen, self.nets), mesh)
        self.frozen, self.nets = place((self.frozen, self.nets), (frozen_sh, nets_sh))
        self._step, self._heldout, self._to_host = self.program.compiled(self.state_shardings, frozen_sh, nets_sh)

    def init(self) -> FinetuneState:
        """The starting state, sharded over the mesh by ``state_shardings`` (``fsdp_shardings``)."""
        return place(self._init(), self.state_shardings)

    def _init(self) -> FinetuneState:
        return FinetuneState(
            decoder=self.trainable0,
            discriminator=self.disc0,
            opt_decoder=self.tx_decoder.init(self.trainable0),
            opt_discriminator=self.tx_discriminator.init(self.disc0),
            lecam=init_lecam_state(),
            step=jnp.zeros((), jnp.int32),
            key=jax.random.PRNGKey(int(self.f.seed)),  # raw uint32: checkpoints hold it as an array
        )

    def global_batch(self, local_images) -> jax.Array:
        """This process's rows of the global batch (all of it with one process) as the global
        array, split over the mesh's ``(data, fsdp)``."""
        if isinstance(local_images, jax.Array) and local_images.sharding == self.program.batch_sharding:
            return local_images
        return jax.make_array_from_process_local_data(self.program.batch_sharding, np.asarray(local_images))

    def step(self, state: FinetuneState, images) -> tuple[FinetuneState, dict]:
        """One fine-tuning step (``state`` is donated) on ``images`` in [-1, 1], this process's
        rows of the global batch: ``(b, c, h, w)`` for the SD-VAE, clips ``(b, 1 + 4k, c, h, w)``
        for the Wan VAE."""
        return self._step(state, self.frozen, self.nets, self.global_batch(images))

    def heldout_error(self, state: FinetuneState, images, key) -> tuple[jax.Array, jax.Array]:
        """``(mse, psnr)`` in [0, 1] units of the reconstructions of ``images`` from noisy
        latents drawn with ``key`` (the same key each time: comparable across steps)."""
        if jnp.issubdtype(getattr(key, "dtype", np.uint32), jax.dtypes.prng_key):
            key = jax.random.key_data(key)
        images, key = place_replicated((np.asarray(images), np.asarray(key)), self.mesh)
        return self._heldout(state.decoder, self.frozen, images, key)

    def vae(self, state: FinetuneState) -> AutoencoderKL:
        """The VAE with the state's decoder, on the host (every process holds all of it: the
        fsdp-sharded weights are gathered first)."""
        host = jax.tree.map(jnp.asarray, jax.device_get(self._to_host((state.decoder, self.frozen))))
        return self.program.vae(*host)
