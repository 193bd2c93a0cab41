"""Moving digits: clips of scikit-learn's 8x8 digits drifting across the frame (shifted
with wrap-around by a constant velocity), labelled by digit. The video counterpart of
the digits main job: tiny, embedded, no download, and unbounded in time, so that a model
trained on short clips can be asked for longer ones.

Clip ``i`` of a split is digit ``i mod n`` with a velocity ``(dy, dx)`` in
``{-1, 0, 1}^2 \\ {(0, 0)}`` and a start offset, both drawn from ``(seed, i)``: a
deterministic random-access source (grain-compatible)."""

from __future__ import annotations

import numpy as np

VELOCITIES = np.array([(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)], np.int64)


def shift_clip(image: np.ndarray, num_frames: int, velocity: tuple[int, int], offset: tuple[int, int] = (0, 0)):
    """``(c, h, w)`` to ``(num_frames, c, h, w)``: frame ``k`` is the image rolled by
    ``offset + k * velocity`` pixels (rows, columns), wrapping around."""
    dy, dx = velocity
    oy, ox = offset
    return np.stack([np.roll(image, (oy + k * dy, ox + k * dx), axis=(-2, -1)) for k in range(num_frames)])


class MovingDigitsSource:
    """Clips ``{"image": (num_frames, 1, 8, 8) float32 in [-1, 1], "label": int32}``."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, num_frames: int, seed: int = 0):
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        if images.ndim != 4 or len(images) != len(labels) or len(images) == 0:
            raise ValueError(
                f"images must be (n, c, h, w) with one label each, got {images.shape} and {len(labels)} labels"
            )
        self.images, self.labels = images, labels
        self.num_frames, self.seed = int(num_frames), int(seed)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        rng = np.random.default_rng((self.seed, i))
        velocity = VELOCITIES[rng.integers(len(VELOCITIES))]
        h, w = self.images.shape[-2:]
        offset = (int(rng.integers(h)), int(rng.integers(w)))
        clip = shift_clip(self.images[i], self.num_frames, tuple(velocity), offset)
        return {"image": clip.astype(np.float32), "label": np.int32(self.labels[i])}

    def clips(self) -> np.ndarray:
        """Every clip, ``(n, num_frames, c, h, w)``."""
        return np.stack([self[i]["image"] for i in range(len(self))])
