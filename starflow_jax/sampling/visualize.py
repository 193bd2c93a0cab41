"""Samples to pictures: image grids (PNG) and frame sequences (GIF, MP4)."""

from __future__ import annotations

import math
import pathlib

import numpy as np


def to_uint8(x: np.ndarray, pixel_space: bool) -> np.ndarray:
    """``(n, c, h, w)`` to ``(n, h, w, 1|3)`` uint8. Pixel-space data is read as ``[-1, 1]``;
    anything else (latents) is shown by its first three channels, min-max scaled."""
    x = np.asarray(x, np.float32)
    if x.ndim != 4:
        raise ValueError(f"expected (n, c, h, w), got shape {x.shape}")
    c = x.shape[1]
    if pixel_space and c in (1, 3):
        img = (np.clip(x, -1.0, 1.0) + 1.0) * 127.5
    else:
        x = x[:, :3] if c >= 3 else x[:, :1]
        lo, hi = x.min(), x.max()
        img = (x - lo) / max(hi - lo, 1e-8) * 255.0
    return np.round(img).astype(np.uint8).transpose(0, 2, 3, 1)


def grid(images: np.ndarray, nrow: int | None = None, pad: int = 1) -> np.ndarray:
    """``(n, h, w, c)`` uint8 to one ``(H, W, c)`` grid image."""
    n, h, w, c = images.shape
    nrow = nrow or int(math.ceil(math.sqrt(n)))
    ncol = int(math.ceil(n / nrow))
    out = np.zeros((ncol * (h + pad) + pad, nrow * (w + pad) + pad, c), np.uint8)
    for i in range(n):
        r, k = divmod(i, nrow)
        out[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + k * (w + pad) : pad + k * (w + pad) + w] = images[i]
    return out


def _pil(img: np.ndarray, scale: int):
    from PIL import Image

    im = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    return im


def save_png(path: str | pathlib.Path, img: np.ndarray, scale: int = 1) -> None:
    """A PNG at ``path``, a local file or an object (``gs://...``, written in one upload)."""
    if "://" in str(path):
        import io

        from etils import epath

        buf = io.BytesIO()
        _pil(img, scale).save(buf, format="PNG")
        epath.Path(path).write_bytes(buf.getvalue())
        return
    _pil(img, scale).save(str(path), format="PNG")


def save_gif(path: str | pathlib.Path, frames: list[np.ndarray], fps: float = 8.0, scale: int = 1) -> None:
    ims = [_pil(f, scale) for f in frames]
    ims[0].save(str(path), format="GIF", save_all=True, append_images=ims[1:], duration=int(1000 / fps), loop=0)


def save_mp4(path: str | pathlib.Path, frames: list[np.ndarray], fps: float = 8.0, scale: int = 1) -> None:
    """H.264 MP4 (yuv420p) of ``(H, W, 1|3)`` uint8 frames through PyAV; odd sizes are
    padded by one edge row / column (the codec needs even sizes). Needs the ``video``
    extra (``av``)."""
    try:
        import av
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("writing MP4 needs PyAV: pip install 'starflow-jax[video]'") from e
    from fractions import Fraction

    if not frames:
        raise ValueError("no frames to write")
    ims = [np.asarray(_pil(f, scale).convert("RGB")) for f in frames]
    h, w = ims[0].shape[:2]
    hh, ww = h + h % 2, w + w % 2
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = ww, hh, "yuv420p"
        stream.options = {"crf": "12"}
        for im in ims:
            im = np.pad(im, ((0, hh - h), (0, ww - w), (0, 0)), mode="edge")
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(im), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def read_video_frames(path: str | pathlib.Path) -> np.ndarray:
    """All frames of a video file as ``(t, H, W, 3)`` uint8 (PyAV)."""
    import av

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
