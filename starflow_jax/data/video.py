"""Video clips for STARFlow-V: which frames make a clip, decoding them (PyAV, the FFmpeg
bindings), and a random-access grain source over a folder of videos with captions.

A clip is ``num_frames`` frames, ``src_fps / out_fps`` source frames apart when a lower
output frame rate is asked for (consecutive frames otherwise), starting at a random frame;
a video too short for that gets ``num_frames`` frames spread evenly over its whole length
(``clip_indices``, the reference's ``sample_clip`` rule). Frames are resized (shorter side,
bicubic, antialiased) and centre-cropped, as ``(t, c, h, w)`` float32 in [-1, 1].
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mov", ".avi", ".mkv")


def clip_indices(
    total_frames: int,
    src_fps: float,
    num_frames: int,
    out_fps: float | None,
    rng: np.random.Generator | int | None = None,
) -> np.ndarray:
    """Source frame indices (``num_frames`` int64, non-decreasing) of one clip of a video of
    ``total_frames`` frames at ``src_fps``.

    * ``out_fps`` None or ``>= src_fps``: consecutive frames (step 1; no frame is invented);
      else frames ``step = src_fps / out_fps`` apart (at least 1), so the clip spans
      ``(num_frames - 1) / out_fps`` seconds.
    * The first frame is uniform over ``0 .. floor(total - step * (num_frames - 1) - 1)``
      (from ``rng``); frame ``i`` is ``round(start + i * step)`` (halves to even).
    * When ``total - step * (num_frames - 1) <= 1`` the video is too short for that:
      ``num_frames`` indices evenly spaced over ``0 .. total - 1`` (truncated to integers;
      frames repeat when the video has fewer than ``num_frames``).
    """
    total_frames, num_frames = int(total_frames), int(num_frames)
    if total_frames < 1:
        raise ValueError(f"a clip needs a video of at least 1 frame, got {total_frames}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if not src_fps > 0:
        raise ValueError(f"the source frame rate must be positive, got {src_fps}")
    if out_fps is not None and not out_fps > 0:
        raise ValueError(f"out_fps must be positive (or None for the native rate), got {out_fps}")
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    gaps = num_frames - 1
    step = 1.0
    if out_fps is not None and out_fps < src_fps and gaps > 0:
        seconds = gaps / out_fps  # the clip's duration
        step = max(seconds * src_fps / gaps, 1.0)  # source frames between two clip frames
    room = total_frames - step * gaps
    if room <= 1:
        return np.linspace(0, total_frames - 1, num_frames).astype(np.int64)
    last_start = int(math.floor(room - 1))
    start = int(rng.integers(0, last_start + 1)) if last_start > 0 else 0
    return np.array([round(start + i * step) for i in range(num_frames)], np.int64)


def _open(path):
    """The file as a PyAV container. (PyAV directly: imageio's PyAV plugin runs a full
    ``gc.collect()`` on every close, seconds per clip in a process holding many objects.)"""
    try:
        import av
    except ImportError as e:  # not an unreadable file: a missing extra
        raise ImportError("reading video files needs PyAV: pip install -e '.[video]'") from e
    return av.open(str(path))


def video_info(path: str | Path) -> tuple[int, float]:
    """``(frame count, frames per second)`` of a video file's first video stream, from its
    metadata; the frames are counted by decoding them when the container does not say."""
    try:
        with _open(path) as f:
            stream = f.streams.video[0]
            n = int(stream.frames or 0)
            rate = stream.average_rate or stream.guessed_rate
            fps = float(rate) if rate else None
            if n <= 0:
                n = sum(1 for _ in f.decode(stream))
    except Exception as e:  # av raises OSError, av.error.*, IndexError (no video stream)...
        raise ValueError(f"cannot read video file {path}: {type(e).__name__}: {e}") from e
    if n < 1:
        raise ValueError(f"video file {path} has no frames")
    if fps is None or not float(fps) > 0:
        raise ValueError(f"video file {path} does not give its frame rate (fps={fps!r})")
    return n, float(fps)


class _ShortVideo(ValueError):
    """The stream ended before a requested frame (a container that over-reports its frames)."""

    def __init__(self, msg: str, decoded: int):
        super().__init__(msg)
        self.decoded = decoded


def _size_hw(size) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        h = w = int(size)
    else:
        try:
            h, w = (int(s) for s in size)
        except (TypeError, ValueError):
            raise ValueError(f"size must be an int or (height, width), got {size!r}") from None
    if h < 1 or w < 1:
        raise ValueError(f"size must be positive, got {size!r}")
    return h, w


def resize_crop(frame: np.ndarray, h: int, w: int, channels: int = 3) -> np.ndarray:
    """An ``(H, W, 3)`` uint8 frame scaled (bicubic, antialiased) to cover ``h x w``, then
    centre-cropped to it; ``(channels, h, w)`` float32 in [-1, 1] (1 channel: greyscale)."""
    from PIL import Image

    im = Image.fromarray(np.ascontiguousarray(frame[..., :3])).convert("RGB" if channels == 3 else "L")
    W, H = im.size
    scale = max(h / H, w / W)  # shorter side (relative to the target) to the target
    nw, nh = max(w, round(W * scale)), max(h, round(H * scale))
    if (nw, nh) != (W, H):
        im = im.resize((nw, nh), Image.Resampling.BICUBIC)  # PIL filters over the scaled support
    left, top = (nw - w) // 2, (nh - h) // 2
    im = im.crop((left, top, left + w, top + h))
    a = np.asarray(im, np.float32) / 127.5 - 1.0
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def read_clip(path: str | Path, indices: Sequence[int], size) -> np.ndarray:
    """Frames ``indices`` (any order, repeats allowed) of a video, decoded in stream order
    from the start (exact, no seeking) up to the last one needed, each resized and
    centre-cropped to ``size`` (an int: square, or ``(h, w)``); ``(t, 3, h, w)`` float32
    in [-1, 1]."""
    h, w = _size_hw(size)
    idx = [int(i) for i in indices]
    if not idx:
        raise ValueError("read_clip needs at least one frame index")
    if min(idx) < 0:
        raise ValueError(f"frame indices must be >= 0, got {min(idx)}")
    wanted, last, got = set(idx), max(idx), {}
    decoded = 0
    try:
        with _open(path) as f:
            for i, frame in enumerate(f.decode(video=0)):
                decoded = i + 1
                if i in wanted:
                    got[i] = resize_crop(frame.to_ndarray(format="rgb24"), h, w)
                if i >= last:
                    break
    except Exception as e:
        raise ValueError(f"cannot read video file {path}: {type(e).__name__}: {e}") from e
    if last not in got:
        raise _ShortVideo(f"video file {path} has {decoded} frames, frame {last} was asked for", decoded)
    return np.stack([got[i] for i in idx])


def _video_files(root: Path) -> list[Path]:
    """Video files under ``root`` (recursively; hidden files and folders skipped), sorted."""
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file()
        and p.suffix.lower() in VIDEO_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


class VideoFolderSource:
    """Random access over the videos under ``root``: record ``i`` is
    ``{"video": (num_frames, 3, h, w) float32 in [-1, 1], "caption": str, "fps": float}``.

    * Videos: the ``.mp4 .webm .mov .avi .mkv`` files under ``root`` (recursive, sorted), or
      with ``captions_file`` (``.tsv``: ``file<TAB>caption``; ``.jsonl``: ``{"file", "caption"}``;
      paths relative to ``root``) the files it lists, in its order.
    * Captions: from ``captions_file``, else the sidecar ``<video name>.txt`` next to each
      video (a video without one is an error).
    * Clips: ``clip_indices`` with ``out_fps = fps`` (None: the native rate), drawn from a
      generator seeded by ``(seed, i)``: the same clip of video ``i`` on every read. The
      record's ``fps`` is ``fps`` when given (the rate the prompt template announces, as in
      the reference), else the video's own.
    * ``size``: an int (square frames) or ``(h, w)``.

    Frame counts and rates are read once per video (lazily) and cached.
    """

    def __init__(
        self,
        root: str | Path,
        num_frames: int,
        size,
        fps: float | None = None,
        captions_file: str | Path | None = None,
        seed: int = 0,
    ):
        if isinstance(num_frames, bool) or not isinstance(num_frames, (int, np.integer)) or num_frames < 1:
            raise ValueError(f"num_frames must be a positive integer, got {num_frames!r}")
        self.size = _size_hw(size)
        if fps is not None and not float(fps) > 0:
            raise ValueError(f"fps must be positive (or None for each video's own rate), got {fps!r}")
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"video folder {self.root} does not exist or is not a directory")
        self.num_frames, self.fps, self.seed = int(num_frames), None if fps is None else float(fps), int(seed)
        if captions_file is not None:
            from starflow_jax.data.precompute import read_captions

            self.samples = read_captions(self.root, captions_file, extensions=VIDEO_EXTENSIONS, kind="video")
        else:
            files = _video_files(self.root)
            if not files:
                raise ValueError(f"video folder {self.root} has no videos (extensions {', '.join(VIDEO_EXTENSIONS)})")
            missing = [str(p.relative_to(self.root)) for p in files if not p.with_suffix(".txt").is_file()]
            if missing:
                more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
                raise ValueError(
                    f"videos without a caption: {', '.join(missing[:5])}{more}; put the caption in "
                    "<video name>.txt next to each video, or pass a captions file"
                )
            self.samples = [(p, p.with_suffix(".txt").read_text(encoding="utf-8").strip()) for p in files]
        self._info: dict[int, tuple[int, float]] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def info(self, i: int) -> tuple[int, float]:
        """``(frame count, fps)`` of video ``i`` (cached)."""
        if i not in self._info:
            self._info[i] = video_info(self.samples[i][0])
        return self._info[i]

    def clip(self, i: int) -> np.ndarray:
        """The source frame indices of record ``i``'s clip."""
        total, src_fps = self.info(i)
        return clip_indices(total, src_fps, self.num_frames, self.fps, np.random.default_rng([self.seed, i]))

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"record {i} out of range for {len(self)} videos")
        path, caption = self.samples[i]
        try:
            frames = read_clip(path, self.clip(i), self.size)
        except _ShortVideo as e:  # the container over-reported its frames: count what decodes
            if e.decoded < 1:
                raise ValueError(f"video file {path} has no frames") from None
            self._info[i] = (e.decoded, self.info(i)[1])
            frames = read_clip(path, self.clip(i), self.size)
        return {"video": frames, "caption": caption, "fps": self.info(i)[1] if self.fps is None else self.fps}

    def __repr__(self) -> str:
        return (
            f"VideoFolderSource({str(self.root)!r}, num_frames={self.num_frames}, size={self.size}, "
            f"fps={self.fps}: {len(self)} videos)"
        )
