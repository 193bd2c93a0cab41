"""Fréchet distance and Inception Score: pure NumPy on the host, in float64.

The definitions are those of torchmetrics (``FrechetInceptionDistance``,
``InceptionScore``) and pytorch-fid, which STARFlow's reference reports:

* feature statistics: the mean and the unbiased (``n - 1``) covariance of a set of
  feature vectors;
* Fréchet distance: ``||mu1 - mu2||^2 + tr(s1) + tr(s2) - 2 tr(sqrtm(s1 s2))``; the last
  trace is the sum of the square roots of the eigenvalues of ``s1 s2``, computed here as
  those of the symmetric ``sqrt(s1) s2 sqrt(s1)`` (similar to ``s1 s2``, so the same
  eigenvalues, but real and non-negative up to rounding, which is clipped);
* Inception Score: softmax of the logits, split into ``splits`` consecutive chunks the way
  ``torch.chunk`` splits (``ceil(n / splits)`` rows each, the last one shorter, possibly
  fewer chunks), per chunk ``exp(mean_i KL(p_i || mean_j p_j))``; the mean and the
  unbiased standard deviation over chunks. torchmetrics shuffles the rows first
  (``torch.randperm``); here the caller's order is kept (shuffle beforehand if wanted).

Statistics files are pytorch-fid's ``.npz``: arrays ``mu`` and ``sigma``.
"""

from __future__ import annotations

import os

import numpy as np

__all__ = [
    "feature_statistics",
    "frechet_distance",
    "inception_score",
    "save_statistics",
    "load_statistics",
]


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, sigma)`` of ``features`` ``(n, d)``: the mean and the unbiased covariance, float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2:
        raise ValueError(f"features must be a 2-D array (samples, dimensions), got shape {f.shape}")
    if f.shape[0] < 2:
        raise ValueError(f"a covariance needs at least 2 feature vectors, got {f.shape[0]}")
    if not np.all(np.isfinite(f)):
        raise ValueError("features contain NaN or Inf")
    mu = f.mean(axis=0)
    centred = f - mu
    sigma = centred.T @ centred / (f.shape[0] - 1)
    return mu, sigma


def _symmetric_sqrt(s: np.ndarray) -> np.ndarray:
    """The PSD square root of a symmetric matrix (negative rounding eigenvalues clipped)."""
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _check_statistics(mu, sigma, which: str) -> tuple[np.ndarray, np.ndarray]:
    mu, sigma = np.asarray(mu, dtype=np.float64), np.asarray(sigma, dtype=np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{which}: mu must be (d,) and sigma (d, d); got {mu.shape} and {sigma.shape}")
    if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
        raise ValueError(f"{which}: mu or sigma contain NaN or Inf")
    return mu, sigma


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """The Fréchet distance between the Gaussians ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``."""
    mu1, sigma1 = _check_statistics(mu1, sigma1, "first statistics")
    mu2, sigma2 = _check_statistics(mu2, sigma2, "second statistics")
    if mu1.shape != mu2.shape:
        raise ValueError(f"the statistics have different dimensions: {mu1.shape[0]} and {mu2.shape[0]}")
    root1 = _symmetric_sqrt(sigma1)
    inner = root1 @ sigma2 @ root1
    eigenvalues = np.linalg.eigvalsh((inner + inner.T) / 2)
    trace_sqrt = np.sqrt(np.clip(eigenvalues, 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


def _torch_chunks(n: int, splits: int) -> list[tuple[int, int]]:
    """The ``(start, stop)`` row ranges ``torch.chunk(x, splits)`` gives for ``n`` rows."""
    size = -(-n // splits)
    return [(start, min(start + size, n)) for start in range(0, n, size)]


def inception_score(logits, splits: int = 10) -> tuple[float, float]:
    """``(mean, std)`` of the Inception Score of ``logits`` ``(n, classes)`` over ``splits`` chunks."""
    x = np.asarray(logits, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"logits must be a 2-D array (samples, classes), got shape {x.shape}")
    if splits < 1 or x.shape[0] < splits:
        raise ValueError(f"splits must be between 1 and the number of samples ({x.shape[0]}), got {splits}")
    if not np.all(np.isfinite(x)):
        raise ValueError("logits contain NaN or Inf")
    shifted = x - x.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    p = np.exp(log_p)
    scores = []
    for start, stop in _torch_chunks(x.shape[0], splits):
        pc, log_pc = p[start:stop], log_p[start:stop]
        log_marginal = np.log(pc.mean(axis=0, keepdims=True))
        scores.append(np.exp((pc * (log_pc - log_marginal)).sum(axis=1).mean()))
    scores = np.asarray(scores)
    std = float(scores.std(ddof=1)) if len(scores) > 1 else float("nan")
    return float(scores.mean()), std


def save_statistics(path, mu, sigma) -> None:
    """Write ``mu`` and ``sigma`` to ``path`` as pytorch-fid's ``.npz``."""
    mu, sigma = _check_statistics(mu, sigma, os.fspath(path))
    with open(path, "wb") as f:
        np.savez(f, mu=mu, sigma=sigma)


def load_statistics(path) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, sigma)`` from a pytorch-fid ``.npz`` statistics file (float64)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"statistics file {path} does not exist (expected an .npz with 'mu' and 'sigma')")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, EOFError, ValueError) as e:
        raise ValueError(f"{path}: not a readable .npz statistics file: {e}") from e
    missing = [k for k in ("mu", "sigma") if k not in arrays]
    if missing:
        raise ValueError(f"{path}: the statistics file lacks {missing} (it has {sorted(arrays)})")
    mu, sigma = arrays["mu"], arrays["sigma"]
    return _check_statistics(mu, sigma, path)
