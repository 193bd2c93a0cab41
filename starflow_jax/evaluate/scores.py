"""Scores of a set of samples, from their features: digits FD and class accuracy (the
digits classifier), FID and Inception Score (the FID Inception-v3 and a statistics file)."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from starflow_jax.data.digits import load_digits_splits
from starflow_jax.evaluate import frechet
from starflow_jax.evaluate.digits_classifier import DigitsClassifier, TrainingSettings, accuracy
from starflow_jax.evaluate.inception import FIDInceptionV3

__all__ = ["spread_labels", "digits_scores", "inception_features", "inception_scores"]


def spread_labels(num: int, num_classes: int) -> np.ndarray:
    """``num`` labels cycling over ``0 .. num_classes - 1`` (equal counts when ``num`` is a multiple)."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return np.arange(num, dtype=np.int32) % num_classes


def digits_scores(
    classifier: DigitsClassifier,
    samples: np.ndarray,
    labels: np.ndarray | None,
    settings: TrainingSettings | None = None,
    real: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict:
    """``digits_fd`` of ``samples`` ``(n, 1, 8, 8)`` in [-1, 1] to the digits' training split,
    the floor (``digits_fd_heldout``: the held-out split's distance to it), and, given
    ``labels``, ``accuracy``: the share classified as their own labels. ``settings``: the
    classifier's (its split; default ``TrainingSettings()``). ``real``: other real images
    ``(train, heldout)`` to measure against instead (the frames of moving-digits clips)."""
    settings = settings or TrainingSettings()
    if real is None:
        train, heldout = load_digits_splits(settings.num_train, settings.split_seed)
        real = (train.images, heldout.images)
    reference = frechet.feature_statistics(np.asarray(classifier.features(real[0])))
    own = frechet.feature_statistics(np.asarray(classifier.features(samples)))
    floor = frechet.feature_statistics(np.asarray(classifier.features(real[1])))
    out = {
        "digits_fd": frechet.frechet_distance(*own, *reference),
        "digits_fd_heldout": frechet.frechet_distance(*floor, *reference),
    }
    if labels is not None:
        out["accuracy"] = accuracy(classifier, samples, labels)
    return out


def inception_features(model: FIDInceptionV3, images: np.ndarray, batch_size: int = 64):
    """``(pool, logits_unbiased)`` of uint8 ``(n, h, w, 1|3)`` images (grey repeated to RGB)
    as float64 host arrays, ``batch_size`` images at a time."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be uint8 (n, h, w, 1 or 3), got {images.dtype} {images.shape}")
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    forward = nnx.jit(lambda m, x: m(x)[:2])
    pools, logits = [], []
    for start in range(0, len(images), batch_size):
        pool, unbiased = forward(model, jax.numpy.asarray(images[start : start + batch_size]))
        pools.append(np.asarray(pool, np.float64))
        logits.append(np.asarray(unbiased, np.float64))
    return np.concatenate(pools), np.concatenate(logits)


def inception_scores(pool: np.ndarray, logits_unbiased: np.ndarray, stats=None, splits: int = 10) -> dict:
    """``fid`` against ``stats`` ``(mu, sigma)`` (when given) and ``inception_score`` (± ``_std``)
    over ``splits`` chunks, as torchmetrics computes them (fewer samples than splits: one per sample)."""
    out = {}
    if stats is not None:
        if stats[0].shape != (pool.shape[1],):
            raise ValueError(f"the statistics are {stats[0].shape[0]}-d, the Inception pool features {pool.shape[1]}-d")
        out["fid"] = frechet.frechet_distance(*frechet.feature_statistics(pool), *stats)
    mean, std = frechet.inception_score(logits_unbiased, splits=min(splits, len(logits_unbiased)))
    out["inception_score"], out["inception_score_std"] = mean, std
    return out
