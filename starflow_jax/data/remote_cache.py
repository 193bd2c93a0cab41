"""ArrayRecord shards on object storage (``data.path=gs://bucket/latents``), read from a local copy.

The ArrayRecord reader (C++, what grain's ``ArrayRecordDataSource`` opens) reads local files
only, so the files directly under the prefix (the shards and ``index.json``) are copied once
to a cache directory on this machine and read from there. The cache is
``$STARFLOW_DATA_CACHE`` (default ``~/.cache/starflow-jax/data``) ``/<scheme>/<bucket>/<path>``;
a file already there with the same size, fetched after the object was last written, is not
fetched again. Each file is downloaded beside its place and renamed into it, so processes of
one run sharing a host may fetch together. Every host needs room for the whole data set.
"""

from __future__ import annotations

import os
import pathlib

from starflow_jax import storage


def cache_root() -> pathlib.Path:
    return pathlib.Path(
        os.environ.get("STARFLOW_DATA_CACHE") or pathlib.Path.home() / ".cache" / "starflow-jax" / "data"
    )


def local_copy(prefix: str) -> pathlib.Path:
    """The local directory (or file) holding a copy of the object-storage ``prefix``."""
    remote = storage.as_path(prefix)
    scheme, rest = os.fspath(remote).split("://", 1)
    local = cache_root() / scheme / rest.strip("/")
    if not remote.exists():
        raise ValueError(f"ArrayRecord path {prefix} does not exist")
    if not remote.is_dir():
        _fetch(remote, local)
        return local
    for item in remote.iterdir():
        if not item.is_dir():
            _fetch(item, local / item.name)
    return local


def _fetch(remote, local: pathlib.Path) -> None:
    if local.is_file():
        there, here = remote.stat(), local.stat()
        if here.st_size == there.length and here.st_mtime >= there.mtime:
            return
    storage.download_file(remote, local)
