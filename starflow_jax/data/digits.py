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
