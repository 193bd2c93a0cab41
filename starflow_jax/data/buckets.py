"""Aspect-ratio buckets (the reference's ``mix_aspect``): nine width:height ratios, each
with a frame size of about the square's area, and the folder name a bucket's shards get.

The reference (``dataset.py``) sizes bucket ``w:h`` for a base side ``s`` as
``h = round(s / sqrt(w/h) / m) * m``, ``w = round(s * sqrt(w/h) / m) * m`` (``m``: the
multiple each side must be; ``m`` = the VAE factor here, so latents have whole sides), crops
each picture to the bucket's ratio and resizes it, and appends
``"\\n in a {w:h} aspect ratio.\\n"`` to its caption (``prepare_prompts(aspect_ratio=)``).
A batch holds one bucket. (The reference names a secondary image batch's ratio by the
primary data's bucket sizes, which a different base side never matches, so its image
captions say 1:1 whatever their shape; here every bucket's captions name its own ratio.)
"""

from __future__ import annotations

from starflow_jax.sampling.shapes import ASPECT_RATIOS, size_for_aspect_ratio  # width:height; the size rule


def parse_ratio(ratio: str) -> tuple[int, int]:
    """``"16:9"`` -> ``(16, 9)``; a ratio outside ASPECT_RATIOS is an error."""
    if ratio not in ASPECT_RATIOS:
        raise ValueError(f"aspect ratio {ratio!r} is not a bucket; the buckets are {', '.join(ASPECT_RATIOS)}")
    w, h = ratio.split(":")
    return int(w), int(h)


def bucket_size(side: int, ratio: str, multiple: int) -> tuple[int, int]:
    """``(height, width)`` of bucket ``ratio`` for a square of ``side``: about ``side**2``
    pixels, each side a multiple of ``multiple`` (the sizes ``starflow-jax sample
    --aspect-ratio`` draws)."""
    parse_ratio(ratio)
    return size_for_aspect_ratio(int(side), ratio, int(multiple))


def bucket_dir(ratio: str) -> str:
    """The folder name of a bucket's shards: ``"16:9"`` -> ``"16x9"``."""
    w, h = parse_ratio(ratio)
    return f"{w}x{h}"


def ratio_of_dir(name: str) -> str:
    """The inverse of ``bucket_dir``; a folder named otherwise is an error."""
    ratio = name.replace("x", ":", 1)
    if ratio not in ASPECT_RATIOS:
        raise ValueError(
            f"folder {name!r} is not an aspect-ratio bucket: expected one of "
            f"{', '.join(bucket_dir(r) for r in ASPECT_RATIOS)}"
        )
    return ratio
