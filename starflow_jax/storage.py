"""Paths that may lie on object storage: a workdir or a data prefix given as ``gs://bucket/run``
(any scheme ``etils.epath`` reads, the path type orbax uses) or as a local path.

Local paths are handled exactly as before (atomic replacement by rename, appends); on object
storage there is no rename and no append (nor ``flock``: ``workdir.run.WorkdirLock``), so:

* ``replace_text``: a local file is written beside and renamed into place; an object is
  written in one upload (readers see the old object or the new one, never a part);
* ``append_text``: an object is read and written back whole (GCS has no append: gcsfs's
  ``"a"`` mode silently overwrites);
* ``move_tree``: objects are copied, then the originals deleted (a directory rename on GCS
  needs its destination "folder" to exist, which empty prefixes never do).

``etils.epath`` reaches ``gs://`` through fsspec's ``gcsfs`` (tensorflow is not used unless
it is installed); orbax's arrays go through TensorStore's own GCS driver. gcsfs's listings
cache is turned off (unless configured otherwise): TensorStore writes and other processes
change the bucket behind its back, and a stale listing made orbax see a checkpoint step that
had been set aside.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile
import uuid

from etils import epath


def _no_listings_cache() -> None:
    try:
        import fsspec.config
    except ImportError:  # pragma: no cover - fsspec comes with etils[epath]
        return
    for protocol in ("gs", "gcs"):
        fsspec.config.conf.setdefault(protocol, {}).setdefault("use_listings_cache", False)


_no_listings_cache()


def as_path(p) -> epath.Path:
    return epath.Path(p)


def is_local(p) -> bool:
    """Whether ``p`` is a path on this machine's file system (not ``scheme://...``)."""
    return "://" not in os.fspath(p)


def for_orbax(p) -> epath.Path:
    """The directory as orbax should get it: local paths resolved (a symlinked workdir: its
    target), object-storage paths as they are (``epath``'s ``resolve`` would turn
    ``gs://b/x`` into a local ``./gs:/b/x``)."""
    p = as_path(p)
    return p.resolve() if is_local(p) else p


def replace_text(path, text: str) -> None:
    """``path`` holds ``text``, never a part of it (see the module's docstring)."""
    path = as_path(path)
    if not is_local(path):
        path.write_text(text)
        return
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def append_text(path, text: str) -> None:
    path = as_path(path)
    if is_local(path):
        with open(path, "a") as f:
            f.write(text)
    else:
        path.write_text((path.read_text() if path.exists() else "") + text)


def remove(path) -> None:
    """A file or a whole directory."""
    path = as_path(path)
    if is_local(path):
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    elif path.is_dir():
        path.rmtree()
    else:
        path.unlink()


def _fs(path):
    import fsspec

    return fsspec.core.url_to_fs(os.fspath(path))[0]


def move_tree(src, dst) -> None:
    """Move the directory (or file) ``src`` to ``dst``, which must not exist."""
    src, dst = as_path(src), as_path(dst)
    if is_local(src) and is_local(dst):
        shutil.move(str(src), str(dst))
        return
    fs = _fs(src)
    fs.copy(os.fspath(src), os.fspath(dst), recursive=True)
    fs.rm(os.fspath(src), recursive=True)


def upload_tree(local: pathlib.Path, remote) -> None:
    """Copy every file under the local directory ``local`` to the same place under ``remote``
    (each file in one upload; files there that are not here are kept)."""
    remote = as_path(remote)
    for path in sorted(pathlib.Path(local).rglob("*")):
        if path.is_file():
            (remote / path.relative_to(local).as_posix()).write_bytes(path.read_bytes())


def download_file(remote, local: pathlib.Path) -> None:
    """``remote`` copied to ``local``, written beside it and renamed into place (several
    processes may fetch the same file at once: each one's copy is whole)."""
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f".{local.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        with as_path(remote).open("rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 16 << 20)
        os.replace(tmp, local)
    finally:
        tmp.unlink(missing_ok=True)


def local_staging_dir(prefix: str) -> pathlib.Path:
    """A new local temporary directory (for files written locally, then uploaded)."""
    return pathlib.Path(tempfile.mkdtemp(prefix=prefix))
