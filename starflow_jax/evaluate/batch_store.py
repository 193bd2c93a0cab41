"""The finished batches of an ``eval`` run, kept on disk so that an interrupted run continues
where it stopped and several processes can share the batches.

A directory beside the result (``eval.json.parts/``) holds ``settings.json`` (what the
batches were made with: model, seed, sample count, batch size, sampling options, scorer)
and one ``batch_00012.npz`` per finished batch (the arrays the scores are computed from:
samples for the digits scores, Inception features for FID / IS). Each file is written under
a temporary name and renamed, so a batch is either complete or absent. Batch ``i`` is
sampled with a seed of its own, so which process made it, and when, does not change it."""

from __future__ import annotations

import json
import os
import pathlib
import shutil

import numpy as np

SETTINGS = "settings.json"


def parts_dir(out: pathlib.Path) -> pathlib.Path:
    """Where the batches of the run writing ``out`` are kept."""
    return out.with_name(out.name + ".parts")


class BatchStore:
    """The batches of one eval run, ``settings`` fixed when the directory is made."""

    def __init__(self, directory: pathlib.Path, settings: dict, restart: bool = False):
        self.directory = pathlib.Path(directory)
        self.settings = json.loads(json.dumps(settings))  # as it reads back from JSON
        path = self.directory / SETTINGS
        if restart and self.directory.exists():
            shutil.rmtree(self.directory)
        if path.exists():
            kept = json.loads(path.read_text())
            changed = sorted(k for k in set(kept) | set(self.settings) if kept.get(k) != self.settings.get(k))
            if changed:
                detail = ", ".join(f"{k}: {kept.get(k)!r} there, {self.settings.get(k)!r} now" for k in changed)
                raise ValueError(
                    f"{self.directory} holds the batches of an eval with other settings ({detail}); "
                    "run with the same settings to continue it, or pass --overwrite to start over"
                )
        else:
            self.directory.mkdir(parents=True, exist_ok=True)
            _write_atomic(path, lambda f: f.write(json.dumps(self.settings, indent=2).encode()))

    def path(self, index: int) -> pathlib.Path:
        return self.directory / f"batch_{index:05d}.npz"

    def done(self, index: int) -> bool:
        return self.path(index).exists()

    def save(self, index: int, arrays: dict[str, np.ndarray]) -> None:
        _write_atomic(self.path(index), lambda f: np.savez(f, **arrays))

    def load(self, index: int) -> dict[str, np.ndarray]:
        with np.load(self.path(index)) as f:
            return {k: f[k] for k in f.files}

    def gather(self, count: int) -> dict[str, np.ndarray]:
        """Batches ``0 .. count-1`` concatenated in order, key by key; a missing batch is an error."""
        missing = [i for i in range(count) if not self.done(i)]
        if missing:
            raise FileNotFoundError(f"{self.directory}: batches {missing[:8]} of {count} are missing")
        batches = [self.load(i) for i in range(count)]
        return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def _write_atomic(path: pathlib.Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
