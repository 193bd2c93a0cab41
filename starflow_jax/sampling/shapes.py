"""Sample shapes for aspect ratios, as the reference chooses them: the area of a square of
side ``target`` kept, each side rounded to the nearest multiple of ``multiple`` (the
autoencoder's factor times the patch size, so that latents patchify)."""

from __future__ import annotations

import math

ASPECT_RATIOS = ("1:1", "2:3", "3:2", "16:9", "9:16", "4:5", "5:4", "21:9", "9:21")


def size_for_aspect_ratio(target: int, ratio: str | None, multiple: int = 8) -> tuple[int, int]:
    """``(height, width)`` for ``ratio`` ``"w:h"`` (``None``: the square ``target``)."""
    if ratio is None:
        return target, target
    try:
        rw, rh = (int(v) for v in ratio.split(":"))
    except ValueError as e:
        raise ValueError(f"aspect ratio must look like 'w:h' (e.g. 16:9), got {ratio!r}") from e
    if rw <= 0 or rh <= 0:
        raise ValueError(f"aspect ratio sides must be positive, got {ratio!r}")
    r = rw / rh
    area = target * target

    def nearest(x: float) -> int:
        return max(multiple, int(round(x / multiple)) * multiple)

    return nearest(math.sqrt(area / r)), nearest(math.sqrt(area * r))
