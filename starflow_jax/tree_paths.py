"""Names of a pytree leaf from its key path (``jax.tree_util`` keys: dict keys, attributes,
sequence indices; or the plain keys of ``nnx.to_flat_state``)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def path_names(path: Iterable[Any]) -> list[str]:
    """``["blocks", "0", "kernel"]``: each key's dict key, attribute name or index (a plain
    key, e.g. a string of a flat state's path, as it is), as a string."""
    out = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                out.append(str(getattr(k, attr)))
                break
        else:
            out.append(str(k))
    return out


def path_name(path: Iterable[Any], sep: str = "/") -> str:
    """``blocks/0/kernel``: ``path_names`` joined by ``sep``."""
    return sep.join(path_names(path))
