"""The files a command writes, checked before any work: nothing a user saved is replaced
without ``--overwrite``, and a directory that cannot hold the output fails at once, not
after the computation."""

from __future__ import annotations

import os
import pathlib


def check_outputs(paths, overwrite: bool) -> list[pathlib.Path]:
    """Refuse an output that exists (unless ``overwrite``) or is a directory; create each
    output's directory (``mkdir -p``) and check that it can be written to. ``None``
    entries (options not given) are skipped; returns the paths checked."""
    checked = []
    for path in paths:
        if path is None:
            continue
        if "://" in str(path):
            raise ValueError(f"{path}: outputs are written to local files; copy them to object storage afterwards")
        path = pathlib.Path(path)
        if path.is_dir():
            raise ValueError(f"{path} is a directory, not an output file")
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass --overwrite to replace it")
        parent = path.parent
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"cannot write {path}: {parent} is not a directory")
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"cannot create the directory {parent} for {path}: {e.strerror or e}") from e
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ValueError(f"cannot write {path}: {parent} is not writable")
        checked.append(path)
    return checked
