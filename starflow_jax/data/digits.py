"""scikit-learn's handwritten digits (1,797 images of 8x8, grey levels 0..16, 10 classes),
shipped inside the installed package: the default dataset, no download."""

from __future__ import annotations

import dataclasses

import numpy as np

LEVELS = 17  # grey levels 0..16
NUM_CLASSES = 10


@dataclasses.dataclass(frozen=True)
class Split:
    images: np.ndarray  # (n, 1, 8, 8) float32 in [-1, 1]
    labels: np.ndarray  # (n,) int32

    def __len__(self) -> int:
        return int(self.images.shape[0])


def load_digits_splits(num_train: int = 1500, seed: int = 0) -> tuple[Split, Split]:
    """A fixed train / held-out split (``num_train`` / the rest) of the digits."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = d.images.astype(np.float32)  # (1797, 8, 8), values 0..16
    labels = d.target.astype(np.int32)
    if not 0 < num_train < len(images):
        raise ValueError(f"num_train must lie in (0, {len(images)}), got {num_train}")
    perm = np.random.default_rng(seed).permutation(len(images))
    images = (images / (LEVELS - 1) * 2.0 - 1.0)[:, None]
    tr, te = perm[:num_train], perm[num_train:]
    return Split(images[tr], labels[tr]), Split(images[te], labels[te])


def digits_at(images: np.ndarray, size: int, channels: int) -> np.ndarray:
    """The digits ``(n, 1, 8, 8)`` as a model of ``size x size`` pixels and ``channels``
    channels reads them (a stand-in for latents, on the same 17 grey levels): every pixel
    repeated ``size // 8`` times along each axis, channel ``c`` that image rolled by
    ``(c // 2, c % 2)`` pixels (wrapping around), so that the channels differ but stay
    correlated as an autoencoder's do."""
    if size < 8 or size % 8 or channels < 1:
        raise ValueError(
            f"the digits (8x8) can be given at a multiple of 8 pixels with >= 1 channels, got {size}x{size}x{channels}"
        )
    up = np.repeat(np.repeat(images[:, :1], size // 8, axis=-2), size // 8, axis=-1)
    rolled = [np.roll(up, (c // 2, c % 2), axis=(-2, -1)) for c in range(channels)]
    return np.concatenate(rolled, axis=1).astype(np.float32)


def class_embeddings(num_classes: int, txt_size: int, txt_dim: int, seed: int = 0) -> np.ndarray:
    """``(num_classes, txt_size, txt_dim)`` fixed standard-normal embeddings, one per class:
    the digits' "captions" for a text-conditioned model (the null caption is zeros)."""
    return np.random.default_rng((seed, 8)).standard_normal((num_classes, txt_size, txt_dim)).astype(np.float32)
