"""Reference points for held-out bits per dimension: Gaussians fitted to the training
split, evaluated under the same uniform dequantisation as the flow."""

from __future__ import annotations

import math

import numpy as np


def _dequantise(x: np.ndarray, levels: int, rng: np.random.Generator) -> np.ndarray:
    return ((x + 1.0) * ((levels - 1) / 2.0) + rng.uniform(size=x.shape)) / levels * 2.0 - 1.0


def gaussian_bpd(
    train: np.ndarray, heldout: np.ndarray, levels: int, full_covariance: bool = True, seed: int = 0
) -> float:
    """Bits per dimension of ``heldout`` under a Gaussian (full or diagonal covariance)
    fitted by maximum likelihood to the dequantised ``train`` split."""
    rng = np.random.default_rng(seed)
    a = _dequantise(train.reshape(len(train), -1).astype(np.float64), levels, rng)
    b = _dequantise(heldout.reshape(len(heldout), -1).astype(np.float64), levels, rng)
    d = a.shape[1]
    mu = a.mean(0)
    if full_covariance:
        cov = np.cov(a, rowvar=False, bias=True) + 1e-9 * np.eye(d)
    else:
        cov = np.diag(a.var(0) + 1e-9)
    _, logdet = np.linalg.slogdet(cov)
    diff = b - mu
    maha = np.einsum("ni,ij,nj->n", diff, np.linalg.inv(cov), diff)
    nll = 0.5 * (maha + logdet + d * math.log(2 * math.pi))  # nats per example
    return float((nll.mean() / d + math.log(levels / 2.0)) / math.log(2.0))
