"""FID reference statistics of real images: the FID Inception-v3's pool features of every
image under a folder (searched recursively, as the training data's image folder is read:
resized to cover ``image_size``, centre-cropped, RGB), their mean and unbiased covariance
written as pytorch-fid's ``.npz`` (``mu``, ``sigma``) for ``eval --stats``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from starflow_jax.data.image_folder import IMAGE_EXTENSIONS, load_image
from starflow_jax.evaluate.frechet import feature_statistics
from starflow_jax.evaluate.inception import FIDInceptionV3
from starflow_jax.evaluate.scores import inception_features

__all__ = ["image_files", "folder_statistics"]


def image_files(root: str | Path) -> list[Path]:
    """The image files under ``root`` (any depth; hidden folders skipped), sorted by path."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"image folder {root} does not exist or is not a directory")
    files = sorted(
        p
        for p in root.rglob("*")
        if p.is_file()
        and p.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if len(files) < 2:
        raise ValueError(
            f"{root} holds {len(files)} image files ({', '.join(IMAGE_EXTENSIONS)}); statistics need at least 2"
        )
    return files


def folder_statistics(
    model: FIDInceptionV3,
    root: str | Path,
    image_size: int,
    batch_size: int = 64,
    log: Callable[[str], None] = lambda _: None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """``(mu, sigma, count)`` of the Inception pool features of the images under ``root``,
    each read at ``image_size`` (uint8 RGB, as samples are scored)."""
    if int(image_size) < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    files = image_files(root)
    pools = []
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        images = np.stack([load_image(p, int(image_size), 3) for p in chunk])  # (n, 3, s, s) in [-1, 1]
        pixels = np.clip(np.round((images.transpose(0, 2, 3, 1) + 1.0) * 127.5), 0, 255).astype(np.uint8)
        pools.append(inception_features(model, pixels, batch_size=batch_size)[0])
        log(f"features of {min(start + batch_size, len(files))}/{len(files)} images")
    mu, sigma = feature_statistics(np.concatenate(pools))
    return mu, sigma, len(files)
