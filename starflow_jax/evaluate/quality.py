"""Sample quality of a model: samples generated in seeded batches through the sampling
pipeline, then scored: digits FD and class accuracy for models of the embedded digits
(with the motion score for moving-digits clips); FID and Inception Score (the FID
Inception-v3 and a statistics file) and the CLIP score (against prompts or captions) of
other models, decoded to pixels first when latent. ``starflow-jax eval`` and the
training loop's ``config.eval`` both run through here."""

from __future__ import annotations

import math
import pathlib
from collections.abc import Callable, Iterable

import jax.numpy as jnp
import numpy as np

from starflow_jax.sampling.pipeline import Conditioning, TrainingNoise, generate
from starflow_jax.sampling.sampler import SamplingOptions

__all__ = [
    "batch_seed",
    "data_name",
    "is_digits",
    "clip_frames",
    "class_labels",
    "label_conditioning",
    "sample_batches",
    "digits_quality",
    "clip_cosines",
    "clip_quality",
]


def batch_seed(seed: int, index: int) -> int:
    """The sampling seed of batch ``index``: distinct over (seed, index) pairs."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0] & 0x7FFFFFFF)


def data_name(config) -> str:
    return str(config.data.get("name", "")) if "data" in config else ""


def is_digits(config, cfg) -> bool:
    """A model of the embedded digits: images, or moving digits' clips."""
    return data_name(config) in ("digits", "moving_digits") and cfg.in_channels == 1 and cfg.img_size == 8


def clip_frames(config) -> int:
    """Frames per sampled clip (moving digits: the training clips' length), 0 for images."""
    return int(config.data.num_frames) if data_name(config) == "moving_digits" else 0


def class_labels(cfg, num: int) -> np.ndarray | None:
    """Labels spread over the classes for a label-conditioned model (txt_size 1; the last
    of txt_dim's rows is the null class), ``None`` for an unconditional one."""
    from starflow_jax.evaluate.scores import spread_labels

    if cfg.txt_dim == 0:
        return None
    if cfg.txt_size != 1:
        raise ValueError(f"sample quality is measured with class labels (txt_size=1); this model has {cfg.txt_size}")
    return spread_labels(num, cfg.txt_dim - 1)


def label_conditioning(cfg, labels: np.ndarray | None) -> Callable[[int, int], Conditioning | None]:
    """The conditioning of samples ``start .. start + n``: their one-hot ``labels`` (the null
    class for guidance), or ``None`` for an unconditional model (``labels is None``)."""
    from starflow_jax.flow.labels import one_hot_labels

    def cond(start: int, n: int) -> Conditioning | None:
        if labels is None:
            return None
        idx = jnp.asarray(labels[start : start + n])
        return Conditioning(one_hot_labels(idx, cfg.txt_dim - 1), one_hot_labels(-jnp.ones_like(idx), cfg.txt_dim - 1))

    return cond


def record_conditioning(records) -> Callable[[int, int], Conditioning]:
    """The conditioning of samples ``start .. start + n``: the text embeddings (``cond``) of
    records ``start .. start + n`` of a text-conditioned model's data (cycled; the null
    embedding zeros, as training drops captions to)."""

    def cond(start: int, n: int) -> Conditioning:
        y = np.stack([np.asarray(records[(start + j) % len(records)]["cond"], np.float32) for j in range(n)])
        return Conditioning(jnp.asarray(y), jnp.zeros_like(jnp.asarray(y)))

    return cond


def sample_batches(
    model,
    config,
    batches: Iterable[int],
    *,
    num: int,
    batch_size: int,
    seed: int,
    opts: SamplingOptions,
    conditioning: Callable[[int, int], Conditioning | None],
    temperature: float = 1.0,
    noise: TrainingNoise | None = None,
    denoise: bool = True,
    quantize: bool = False,
    decode: Callable | None = None,
    batch_sharding=None,
    save: Callable[[int, np.ndarray], None],
    log: Callable[[str], None] = lambda _: None,
) -> None:
    """Generate the given ``batches`` of ``num`` samples (batch ``i``: samples ``i *
    batch_size ..``, seed ``batch_seed(seed, i)``, ``conditioning(start, n)`` of those samples,
    decoded by ``decode`` when given, split over ``batch_sharding``'s devices) and hand
    each to ``save(i, samples)`` as float32 host arrays ``(n, c, h, w)`` or, for clips,
    ``(n, t, c, h, w)``. The same (seed, batch) gives the same samples whichever process
    or run makes it."""
    import time

    cfg = model.cfg
    noise = noise if noise is not None else TrainingNoise.from_config(config)
    frames = (clip_frames(config),) if clip_frames(config) else ()
    total, t0 = math.ceil(num / batch_size), time.time()
    batches = list(batches)
    for k, i in enumerate(batches):
        start = i * batch_size
        n = min(batch_size, num - start)
        samples = generate(
            model,
            (n, *frames, cfg.in_channels, cfg.img_size, cfg.img_size),
            batch_seed(seed, i),
            conditioning(start, n),
            opts,
            temperature=temperature,
            noise=noise,
            denoise_samples=denoise,
            quantize_samples=quantize,
            decode=decode,
            batch_sharding=batch_sharding,
        )
        save(i, np.asarray(samples.x, np.float32))
        spent = time.time() - t0
        left = spent / (k + 1) * (len(batches) - k - 1)
        log(f"sampled batch {i + 1}/{total} ({k + 1} of this run's {len(batches)}; {spent:.1f}s, ~{left:.0f}s left)")


def digits_quality(
    config, samples: np.ndarray, labels: np.ndarray | None, classifier_path, log=print, rounded: bool = False
) -> dict:
    """Digits FD and accuracy of ``samples`` (the digits classifier at ``classifier_path``,
    trained there in seconds when absent); for clips over all their frames (each frame drawn
    for the clip's label) against real clips' frames, with the real held-out frames'
    accuracy as the ceiling and the motion score of the clips beside the real held-out clips'
    (``rounded``: the samples were rounded to ``train.levels``, which sets the motion score's
    floor: ``moving_digits.unrounded_floor_levels``)."""
    from starflow_jax.evaluate import digits_classifier as dc
    from starflow_jax.evaluate.scores import digits_scores

    path = pathlib.Path(classifier_path)
    classifier = dc.load_or_train(path, log=log)
    if samples.ndim == 4:
        return {"classifier": str(path), **digits_scores(classifier, np.clip(samples, -1.0, 1.0), labels)}
    # clips: digits rolled off the centre, which the classifier (trained on centred digits)
    # reads less well: the real frames' accuracy is given as the ceiling
    from starflow_jax.data.moving_digits import config_motion_report, label_digit
    from starflow_jax.data.sources import make_data

    data = make_data(config)
    train, held = data.train_images, data.heldout_images  # (n, t, 1, 8, 8)
    t = samples.shape[1]
    frames = np.clip(samples.reshape(-1, *samples.shape[2:]), -1.0, 1.0)
    if labels is not None and config.data.get("motion_labels", False):
        labels = label_digit(labels)  # digit + 10 * velocity index: the digit
    frame_labels = None if labels is None else np.repeat(labels, t)
    real = (train.reshape(-1, *train.shape[2:]), held.reshape(-1, *held.shape[2:]))
    out = {"classifier": str(path), **digits_scores(classifier, frames, frame_labels, real=real)}
    if labels is not None:
        out["accuracy_real"] = dc.accuracy(classifier, real[1], np.repeat(data.heldout.labels, held.shape[1]))
    out.update(config_motion_report(config, samples, held, rounded))
    return out


def clip_cosines(model, pixels: np.ndarray, ids: np.ndarray, start: int = 0) -> np.ndarray:
    """``100 cos(image, prompt)`` of each of a batch of uint8 images ``(n, h, w, 1|3)`` (grey
    repeated to RGB) against its prompt, row ``(start + j) mod len(ids)`` of the CLIP token
    ids, preprocessed and scored as torchmetrics does."""
    from starflow_jax.evaluate import clip

    if pixels.shape[-1] == 1:
        pixels = np.repeat(pixels, 3, axis=-1)
    image = model.image_features(jnp.asarray(clip.preprocess_images(pixels, model.config.vision.image_size)))
    text = model.text_features(jnp.asarray(ids[(start + np.arange(len(pixels))) % len(ids)]))
    return np.asarray(clip.clip_scores(image, text), np.float64)


def clip_quality(model, pixels: np.ndarray, ids: np.ndarray) -> dict:
    """torchmetrics' CLIP score of the images against their prompts (the mean of the pairs'
    ``100 cos``, clamped at 0) and the mean before the clamp."""
    mean = float(np.mean(clip_cosines(model, pixels, ids)))
    return {"clip_score": max(mean, 0.0), "clip_score_mean": mean}
