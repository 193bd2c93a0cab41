"""An image folder with one subfolder per class, as a random-access grain source:
record ``i`` is ``{"image": float32 (channels, size, size) in [-1, 1], "label": int32}``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def _image_files(folder: Path) -> list[Path]:
    """The folder's image files (not recursive), by extension case-insensitively, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def load_image(path: str | Path, image_size, channels: int = 3) -> np.ndarray:
    """One image: resized (bicubic) to cover ``image_size`` (a side, or ``(height, width)``),
    centre crop to it, (C, H, W) in [-1, 1]."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            im = im.convert("RGB" if channels == 3 else "L")
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise ValueError(f"cannot read image file {path}: {type(e).__name__}: {e}") from e
    out_h, out_w = (image_size, image_size) if np.ndim(image_size) == 0 else tuple(image_size)
    w, h = im.size
    scale = max(out_w / w, out_h / h)
    nw, nh = max(out_w, round(w * scale)), max(out_h, round(h * scale))
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - out_w) // 2, (nh - out_h) // 2
    im = im.crop((left, top, left + out_w, top + out_h))
    a = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


class ImageFolderSource:
    """``root/<class>/<image>``: sorted class folder names are labels ``0..K-1`` (hidden folders,
    names starting with ``.``, are skipped); each class's images are its png/jpg/jpeg/bmp/webp
    files, sorted. Images are decoded on access; a corrupt file raises a ValueError naming it."""

    def __init__(self, root: str | Path, image_size: int, channels: int = 3):
        if int(image_size) < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels}")
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"image folder {self.root} does not exist or is not a directory")
        self.classes = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not self.classes:
            raise ValueError(f"image folder {self.root} has no class subfolders (expected root/<class>/<image>)")
        self.samples: list[tuple[Path, int]] = []
        for label, name in enumerate(self.classes):
            files = _image_files(self.root / name)
            if not files:
                raise ValueError(
                    f"class folder {self.root / name} has no images (extensions {', '.join(IMAGE_EXTENSIONS)})"
                )
            self.samples += [(f, label) for f in files]
        self.image_size, self.channels = int(image_size), channels

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        path, label = self.samples[i]
        return {"image": load_image(path, self.image_size, self.channels), "label": np.array(label, dtype=np.int32)}

    def __repr__(self) -> str:
        return (
            f"ImageFolderSource({str(self.root)!r}, image_size={self.image_size}, channels={self.channels}: "
            f"{len(self)} images, {self.num_classes} classes)"
        )
