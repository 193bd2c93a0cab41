"""Moving digits: clips of scikit-learn's 8x8 digits drifting across the frame (shifted
with wrap-around by a constant velocity), labelled by digit. The video counterpart of
the digits main job: tiny, embedded, no download, and unbounded in time, so that a model
trained on short clips can be asked for longer ones.

Clip ``i`` of a split is digit ``i mod n`` with a velocity ``(dy, dx)`` in
``{-1, 0, 1}^2 \\ {(0, 0)}`` and a start offset, both drawn from ``(seed, i)``: a
deterministic random-access source (grain-compatible). A training split of ``variants``
clips per image shows each digit moving in several ways (``data.clip_variants``)."""

from __future__ import annotations

import numpy as np

DIGIT_CLASSES = 10
VELOCITIES = np.array([(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)], np.int64)


def shift_clip(image: np.ndarray, num_frames: int, velocity: tuple[int, int], offset: tuple[int, int] = (0, 0)):
    """``(c, h, w)`` to ``(num_frames, c, h, w)``: frame ``k`` is the image rolled by
    ``offset + k * velocity`` pixels (rows, columns), wrapping around."""
    dy, dx = velocity
    oy, ox = offset
    return np.stack([np.roll(image, (oy + k * dy, ox + k * dx), axis=(-2, -1)) for k in range(num_frames)])


def motion_label(digit: int, velocity_index: int) -> int:
    """The label of ``digit`` moving by velocity ``velocity_index`` (``data.motion_labels``):
    ``digit + 10 * velocity_index``."""
    return int(digit) + DIGIT_CLASSES * int(velocity_index)


def label_digit(labels: np.ndarray) -> np.ndarray:
    """The digit of labels made by ``motion_label`` (plain digit labels pass unchanged)."""
    return np.asarray(labels) % DIGIT_CLASSES


def parse_velocities(text: str) -> np.ndarray:
    """``"dy,dx;dy,dx"`` (``data.velocities``) as an ``(n, 2)`` array; ``""``: ``VELOCITIES``.
    Other sets of velocities make diagnostic data (one known velocity, or whole patches per
    frame); the motion score measures against the clips' own set (``config_velocities``)."""
    if not text.strip():
        return VELOCITIES
    try:
        out = np.array([[int(a) for a in pair.split(",")] for pair in text.split(";") if pair.strip()], np.int64)
    except ValueError:
        out = np.zeros((0, 0))
    if out.ndim != 2 or out.shape[0] == 0 or out.shape[1] != 2:
        raise ValueError(f'data.velocities must be "dy,dx" pairs separated by ";" (e.g. "0,1;1,1"), got {text!r}')
    return out


class MovingDigitsSource:
    """Clips ``{"image": (num_frames, 1, 8, 8) float32 in [-1, 1], "label": int32}``."""

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        num_frames: int,
        seed: int = 0,
        velocities: np.ndarray = VELOCITIES,
        variants: int = 1,
        motion_labels: bool = False,
    ):
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        if images.ndim != 4 or len(images) != len(labels) or len(images) == 0:
            raise ValueError(
                f"images must be (n, c, h, w) with one label each, got {images.shape} and {len(labels)} labels"
            )
        self.images, self.labels = images, labels
        self.num_frames, self.seed = int(num_frames), int(seed)
        self.velocities = np.asarray(velocities, np.int64).reshape(-1, 2)
        if isinstance(variants, bool) or int(variants) < 1:
            raise ValueError(f"variants (clips per image) must be >= 1, got {variants!r}")
        self.variants = int(variants)
        self.motion_labels = bool(motion_labels)
        self.num_digit_classes = int(np.max(labels)) + 1 if len(labels) else 0

    def __len__(self) -> int:
        return len(self.images) * self.variants

    def __getitem__(self, j: int) -> dict:
        """Clip ``j``: image ``j mod n`` with the velocity and offset drawn from ``(seed, j)``
        (clips ``0 .. n - 1``, one per image, are the same whatever ``variants``)."""
        j = int(j)
        if not 0 <= j < len(self):
            raise IndexError(f"clip {j} of a source of {len(self)}")
        i = j % len(self.images)
        rng = np.random.default_rng((self.seed, j))
        velocity = self.velocities[rng.integers(len(self.velocities))]
        h, w = self.images.shape[-2:]
        offset = (int(rng.integers(h)), int(rng.integers(w)))
        clip = shift_clip(self.images[i], self.num_frames, tuple(velocity), offset)
        label = int(self.labels[i])
        if self.motion_labels:
            label = motion_label(label, int(np.flatnonzero((self.velocities == velocity).all(axis=1))[0]))
        return {"image": clip.astype(np.float32), "label": np.int32(label)}

    def clips(self) -> np.ndarray:
        """One clip per image (the first ``n``), ``(n, num_frames, c, h, w)``."""
        return np.stack([self[i]["image"] for i in range(len(self.images))])


def _check_clips(clips: np.ndarray) -> np.ndarray:
    clips = np.asarray(clips, np.float64)
    if clips.ndim != 5 or clips.shape[0] == 0 or clips.shape[1] < 2:
        raise ValueError(f"clips must be (n >= 1, t >= 2, c, h, w), got shape {clips.shape}")
    if not np.all(np.isfinite(clips)):
        raise ValueError("clips hold NaN or Inf values")
    return clips


def config_velocities(config) -> np.ndarray:
    """The velocities of a run's moving-digits clips (``data.velocities``, default the 8 of
    ``VELOCITIES``): the set its motion score measures against."""
    return parse_velocities(str(config.data.get("velocities", "") or ""))


def config_classes(config) -> int:
    """The labels of a run's moving-digits clips: the 10 digits, or with ``data.motion_labels``
    each digit with each of the run's velocities (``motion_label``)."""
    motion = bool(config.data.get("motion_labels", False))
    return DIGIT_CLASSES * (len(config_velocities(config)) if motion else 1)


def motion_errors(clips: np.ndarray, velocities: np.ndarray = VELOCITIES) -> np.ndarray:
    """How far each clip is from moving digits, ``(n,)``: for the best of the constant
    ``velocities`` ``v`` (the 8 of the main job by default), the mean absolute difference
    between frame ``k + 1`` and frame ``k`` rolled by ``v`` (over frame pairs and pixels), in
    units of the grey range (clips in ``[-1, 1]``: differences halved). 0 for an exactly
    rolled clip."""
    clips = _check_clips(clips)
    prev, nxt = clips[:, :-1], clips[:, 1:]
    per_v = np.stack(
        [
            np.abs(nxt - np.roll(prev, tuple(int(d) for d in v), axis=(-2, -1))).mean(axis=(1, 2, 3, 4))
            for v in velocities
        ]
    )  # (velocities, n)
    return per_v.min(axis=0) / 2.0


def motion_score(clips: np.ndarray, velocities: np.ndarray = VELOCITIES) -> float:
    """The mean of ``motion_errors`` over clips: 0 for moving digits, larger the more the
    frames change otherwise than by one constant roll."""
    return float(np.mean(motion_errors(clips, velocities)))


def shuffle_frames(clips: np.ndarray, seed: int = 0) -> np.ndarray:
    """Clips whose frame ``k`` is frame ``k`` of a random clip (the same digit positions
    and grey levels, no motion): the chance level of ``motion_score``."""
    clips = _check_clips(clips)
    rng = np.random.default_rng(seed)
    n, t = clips.shape[:2]
    return np.stack([clips[rng.integers(n, size=n), k] for k in range(t)], axis=1)


def dequantised(clips: np.ndarray, levels: int, seed: int = 0) -> np.ndarray:
    """Real clips as a uniformly dequantising run trains on them (``flow.noise.apply_noise``,
    independent uniform draws of seed ``seed``): what the unrounded samples of a model that
    learnt the data exactly look like."""
    from starflow_jax.flow.noise import apply_noise

    clips = _check_clips(clips)
    draw = np.random.default_rng(seed).uniform(size=clips.shape)
    return np.asarray(apply_noise(clips, draw, 0.0, "uniform", int(levels)))


def unrounded_floor_levels(config, rounded: bool) -> int | None:
    """The grey levels whose dequantisation sets the motion-score floor of a run's samples:
    ``train.levels`` when the run dequantises uniformly and its samples are not rounded back
    to the levels (a perfect model's rounded samples score exactly 0, its unrounded ones the
    score of ``dequantised`` real clips); else ``None``."""
    t = config.train
    if rounded or str(t.get("noise_type", "gaussian")) != "uniform":
        return None
    return int(t.levels)


def motion_report(
    samples: np.ndarray,
    real: np.ndarray,
    seed: int = 0,
    velocities: np.ndarray = VELOCITIES,
    levels: int | None = None,
) -> dict:
    """``motion_score`` of generated clips next to that of real clips (the floor: 0 for
    exactly rolled ones) and of the real clips with frames shuffled across clips (chance).
    With ``levels`` (unrounded samples of a uniformly dequantising run:
    ``unrounded_floor_levels``) also the score of the real clips dequantised to those levels,
    the floor such samples can reach."""
    out = dict(
        motion_score=motion_score(samples, velocities),
        motion_score_real=motion_score(real, velocities),
        motion_score_shuffled=motion_score(shuffle_frames(real, seed), velocities),
    )
    if levels:
        out["motion_score_real_dequantised"] = motion_score(dequantised(real, levels, seed), velocities)
    return out


def config_motion_report(config, samples: np.ndarray, real: np.ndarray, rounded: bool) -> dict:
    """``motion_report`` of a run's samples against its real clips, with the run's velocities
    and, for unrounded samples of a uniformly dequantising run, the dequantised floor
    (``rounded``: the samples were rounded to ``train.levels``)."""
    levels = unrounded_floor_levels(config, rounded)
    return motion_report(samples, real, velocities=config_velocities(config), levels=levels)


def describe_motion(report: dict) -> str:
    return (
        f"motion score {report['motion_score']:.4f} (real clips {report['motion_score_real']:.4f}"
        + (
            f", dequantised as trained {report['motion_score_real_dequantised']:.4f}"
            if "motion_score_real_dequantised" in report
            else ""
        )
        + f", frames shuffled across clips {report['motion_score_shuffled']:.4f})"
    )
