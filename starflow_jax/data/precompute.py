"""Precomputing training data for large runs: images and captions to ArrayRecord shards of
VAE latents and text embeddings (the records ``data.name = "array_record"`` trains on).

Resumable: the shards are fixed by the number of images and ``records_per_shard``; each
is written atomically, and a rerun with the same settings skips the complete ones.
"""
from __future__ import annotations

import json
import math
import pathlib
import time
from typing import Callable, Sequence

import numpy as np

from starflow_jax.data.array_record import SHARD_SUFFIX, _count_records, shard_name, write_index, write_one_shard
from starflow_jax.data.image_folder import IMAGE_EXTENSIONS, load_image

SETTINGS_FILE = "precompute.json"


def read_captions(images_dir: str | pathlib.Path, captions_file: str | pathlib.Path) -> list[tuple[pathlib.Path, str]]:
    """``(image path, caption)`` pairs from a ``.tsv`` (``file<TAB>caption`` per line) or a
    ``.jsonl`` (``{"file": ..., "caption": ...}`` per line); files are relative to
    ``images_dir``. Missing images, duplicates and empty captions files are errors."""
    images_dir, captions_file = pathlib.Path(images_dir), pathlib.Path(captions_file)
    if not images_dir.is_dir():
        raise ValueError(f"--images {images_dir} is not a directory")
    if not captions_file.exists():
        raise ValueError(f"--captions {captions_file} does not exist")
    pairs = []
    for n, line in enumerate(captions_file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if captions_file.suffix == ".jsonl":
            try:
                row = json.loads(line)
                name, caption = row["file"], row["caption"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{captions_file}:{n}: expected {{\"file\": ..., \"caption\": ...}}") from e
        else:
            if "\t" not in line:
                raise ValueError(f"{captions_file}:{n}: expected 'file<TAB>caption'")
            name, caption = line.split("\t", 1)
        path = images_dir / name
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            raise ValueError(f"{captions_file}:{n}: {name} is not an image file ({', '.join(IMAGE_EXTENSIONS)})")
        if not path.exists():
            raise ValueError(f"{captions_file}:{n}: image {path} does not exist")
        pairs.append((path, str(caption).strip()))
    if not pairs:
        raise ValueError(f"{captions_file} lists no images")
    seen = set()
    for p, _ in pairs:
        if p in seen:
            raise ValueError(f"{captions_file} lists {p} twice")
        seen.add(p)
    return pairs


def _check_settings(out: pathlib.Path, settings: dict, overwrite: bool) -> None:
    """A rerun resumes only with the same settings; ``overwrite`` discards earlier shards
    (and nothing else in ``out``)."""
    f = out / SETTINGS_FILE
    if overwrite:
        for p in [*out.glob(f"*{SHARD_SUFFIX}"), *out.glob(f".*{SHARD_SUFFIX}.partial"), out / "index.json", f]:
            p.unlink(missing_ok=True)
    elif f.exists():
        old = json.loads(f.read_text())
        if old != settings:
            diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            raise ValueError(f"{out} holds shards precomputed with other settings ({', '.join(diff)}); "
                             "use another --out or pass --overwrite")
    elif out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty and holds no {SETTINGS_FILE}; use another --out or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps(settings, indent=1, sort_keys=True) + "\n")


def precompute(pairs: Sequence[tuple[pathlib.Path, str]], out_dir: str | pathlib.Path, *,
               encode_images: Callable[[np.ndarray], np.ndarray], encode_texts: Callable[[list[str]], np.ndarray],
               image_size: int, channels: int = 3, batch_size: int = 8, records_per_shard: int = 1024,
               settings: dict | None = None, overwrite: bool = False, log=print) -> list[pathlib.Path]:
    """Encode ``pairs`` batch by batch (``encode_images``: ``(b, c, s, s)`` in [-1, 1] to
    latents; ``encode_texts``: captions to ``(b, txt_size, d)`` embeddings) into shards of
    records ``{latent, text_emb, caption, size}`` under ``out_dir``; returns the shards."""
    if batch_size < 1 or records_per_shard < 1:
        raise ValueError("batch_size and records_per_shard must be >= 1")
    out = pathlib.Path(out_dir)
    n_shards = math.ceil(len(pairs) / records_per_shard)
    _check_settings(out, dict(settings or {}, image_size=image_size, channels=channels, num_images=len(pairs),
                              records_per_shard=records_per_shard), overwrite)
    shards, fields = [], None
    t0, done = time.time(), 0
    for i in range(n_shards):
        part = pairs[i * records_per_shard:(i + 1) * records_per_shard]
        path = out / shard_name(i, n_shards)
        if path.exists() and _count_records(path) == len(part):
            shards.append(path)
            done += len(part)
            log(f"shard {i + 1}/{n_shards} already complete: skipped")
            continue

        def records(part=part):
            for j in range(0, len(part), batch_size):
                chunk = part[j:j + batch_size]
                images = np.stack([load_image(p, image_size, channels) for p, _ in chunk])
                latents = np.asarray(encode_images(images), np.float32)
                texts = np.asarray(encode_texts([c for _, c in chunk]), np.float32)
                if not (np.all(np.isfinite(latents)) and np.all(np.isfinite(texts))):
                    raise ValueError(f"encoding {chunk[0][0]} .. {chunk[-1][0]} gave NaN or Inf")
                for (p, caption), lat, emb in zip(chunk, latents, texts):
                    yield dict(latent=lat, text_emb=emb, caption=caption, size=np.int32(image_size))

        path, _, spec = write_one_shard(out, i, n_shards, records())
        fields = fields or spec
        shards.append(path)
        done += len(part)
        rate = done / max(time.time() - t0, 1e-9)
        log(f"shard {i + 1}/{n_shards} written: {done}/{len(pairs)} images, {rate:.1f} images/s")
    if fields is None:  # every shard was complete already: read the spec from the first
        from starflow_jax.data.array_record import ArrayRecordSource

        first = ArrayRecordSource(shards[0])[0]
        fields = {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in first.items()}
    write_index(out, shards, fields)
    return shards
