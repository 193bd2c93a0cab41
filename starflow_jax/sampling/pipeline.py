"""From a model to pictures, the one path every sampler takes (``starflow-jax sample``, the
training previews, evaluation): the prior noise, the given first frames (encoded and
noise-augmented as the model saw its data), sampling (the attention window decided once, by
``sampler.attention_window``), denoising (the inverse of the training noise) and decoding.

Reading files, writing pictures and encoding prompts stay with the caller."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from starflow_jax.flow.noise import add_noise, quantize
from starflow_jax.model.starflow import StarFlow
from starflow_jax.sampling.denoise import denoise, denoise_video
from starflow_jax.sampling.sampler import SamplingOptions, attention_window, sample


@dataclasses.dataclass(frozen=True)
class TrainingNoise:
    """The noise the flow was trained on, so that given frames get the same and samples lose
    it: Gaussian augmentation ``x + std * eps`` or uniform dequantisation of data holding
    ``levels`` values in ``[-1, 1]``. Samples are denoised by the model's step (the
    reference's) whenever ``std > 0``; dequantised ones can be rounded back to the data's levels
    (``flow.noise.quantize``, the exact inverse)."""

    kind: str = "gaussian"  # 'gaussian' | 'uniform'
    std: float = 0.0
    levels: int = 256

    @classmethod
    def from_config(cls, config, std: float | None = None) -> TrainingNoise:
        """The training run's noise (``config.train``; none when the config has no
        ``train`` section); ``std`` replaces its Gaussian level."""
        t = config.train if "train" in config else {}
        kind = str(t.get("noise_type", "gaussian"))
        level = float(std) if std is not None else float(t.get("noise_std", 0.0))
        return cls(kind=kind, std=level, levels=int(t.get("levels", 256)))

    def augment(self, key: jax.Array, x: jax.Array) -> jax.Array:
        """``x`` with the training noise added (data the flow models)."""
        if self.std > 0 or self.kind == "uniform":
            return add_noise(key, x, self.std, self.kind, self.levels)
        return x


@dataclasses.dataclass(frozen=True)
class Conditioning:
    """Conditioning rows ``(n, txt_size, txt_dim)`` and the null rows guidance contrasts them
    with (the same shape)."""

    y: jax.Array
    y_null: jax.Array


def encode_given(frames: np.ndarray, autoencoder=None) -> jax.Array:
    """Given pixel frames ``(g, c, H, W)`` in ``[-1, 1]`` to the model's space: through the
    autoencoder when the model is latent (a video VAE encodes the clip, an image VAE each
    frame)."""
    if autoencoder is None:
        return jnp.asarray(frames)
    if autoencoder.kind == "video":
        return jnp.asarray(autoencoder.encode(frames[None])[0])
    return jnp.asarray(autoencoder.encode(frames))


@dataclasses.dataclass(frozen=True)
class Samples:
    x: np.ndarray  # pictures (decoded) or the model's samples, float32 on the host
    passes: list[int]  # network passes per flow block, deep block first


def batch_split(devices=None) -> NamedSharding:
    """Arrays split along their first (batch) axis over ``devices`` (default: this process's)."""
    devices = list(devices if devices is not None else jax.local_devices())
    return NamedSharding(Mesh(np.asarray(devices), ("batch",)), PartitionSpec("batch"))


def replicate(model, sharding: NamedSharding):
    """``model`` with every parameter copied to each device of ``sharding``'s mesh (in place)."""
    whole = NamedSharding(sharding.mesh, PartitionSpec())
    nnx.update(model, jax.device_put(nnx.state(model), whole))
    return model


def generate(
    model: StarFlow,
    shape: tuple[int, ...],
    seed: int,
    cond: Conditioning | None = None,
    opts: SamplingOptions | None = None,
    *,
    temperature: float = 1.0,
    given: jax.Array | None = None,
    noise: TrainingNoise = TrainingNoise(),
    denoise_samples: bool = True,
    quantize_samples: bool = False,
    decode: Callable[[jax.Array], jax.Array] | None = None,
    on_block: Callable[[int, int], None] | None = None,
    on_frame: Callable[[int, int], None] | None = None,
    batch_sharding: NamedSharding | None = None,
) -> Samples:
    """``shape[0]`` samples of ``shape`` (``(n, c, h, w)``, or ``(n, t, c, h, w)`` for video)
    from the prior noise ``N(0, temperature^2)`` drawn with ``seed``.

    ``cond``: the conditioning of each sample (guidance with ``opts.guidance > 0`` uses its
    null rows). ``given``: the first frames of every sample in the model's space,
    ``(g, c, h, w)`` (``encode_given``), noise-augmented by ``noise`` with ``seed + 1`` and
    kept. ``noise``: the training noise; its Gaussian part is removed after sampling unless
    ``denoise_samples=False``, and with ``quantize_samples`` samples of uniformly dequantised
    data are rounded back to its ``levels``. ``decode``: the autoencoder's decoder, for latent models.
    ``batch_sharding``: the samples split over its mesh's devices along the batch (the model
    replicated there: ``replicate``); a batch that does not divide evenly runs unsplit.
    Raises ValueError when the result holds NaN or Inf."""
    opts = opts or SamplingOptions()
    cfg = model.cfg
    prior = jax.random.normal(jax.random.key(seed), shape, jnp.float32)
    if temperature != 1.0:
        prior = prior * float(temperature)
    y = None
    if cond is not None:
        y = jnp.concatenate([cond.y, cond.y_null], axis=0) if opts.guidance > 0 else cond.y
    video = len(shape) == 5
    window = attention_window(cfg, opts, shape[1])[0] if video else None
    if given is not None:
        given = noise.augment(jax.random.key(seed + 1), jnp.asarray(given))
        given = jnp.broadcast_to(given[None], (shape[0],) + given.shape)
    if batch_sharding is not None and shape[0] % batch_sharding.mesh.size == 0:
        prior, y, given = (None if a is None else jax.device_put(a, batch_sharding) for a in (prior, y, given))
    x, passes = sample(
        model, prior, y, opts, given=given, on_block=on_block, on_frame=on_frame if video else None, return_passes=True
    )
    if denoise_samples and noise.std > 0:
        y_cond = None if cond is None else cond.y
        if video:
            x = denoise_video(model, x, y_cond, noise_std=noise.std, window=window)
        else:
            x = denoise(model, x, y_cond, noise_std=noise.std)
    if quantize_samples and noise.kind == "uniform":
        x = quantize(x, noise.levels)
    if decode is not None:
        x = decode(x)
    x = np.asarray(jax.device_get(x))
    if not np.all(np.isfinite(x)):
        raise ValueError("sampling produced NaN or Inf values")
    return Samples(x=x, passes=passes)
