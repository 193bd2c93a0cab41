"""Precomputing training data for large runs: images (or video clips) and captions to
ArrayRecord shards of VAE latents and text embeddings (the records
``data.name = "array_record"`` trains on).

Resumable: the shards are fixed by the number of images (videos) and ``records_per_shard``; each
is written atomically, and a rerun with the same settings skips the complete ones.
"""

from __future__ import annotations

import json
import math
import pathlib
import time
from collections.abc import Callable, Sequence

import numpy as np

from starflow_jax.data.array_record import SHARD_SUFFIX, count_records, shard_name, write_index, write_one_shard
from starflow_jax.data.image_folder import IMAGE_EXTENSIONS, load_image

SETTINGS_FILE = "precompute.json"
PIXELS = "pixels"  # the record field of the kept pixels (--keep-pixels): uint8, (c, h, w) or (t, c, h, w)


def pixels_to_uint8(x: np.ndarray) -> np.ndarray:
    """Pixels in [-1, 1] (``load_image``'s, a clip's) as uint8 0..255: exact for 8-bit sources."""
    return np.clip(np.rint((np.asarray(x, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def pixels_from_uint8(a: np.ndarray) -> np.ndarray:
    """``pixels_to_uint8``'s inverse: float32 in [-1, 1] (``load_image``'s scaling)."""
    return np.asarray(a, np.float32) / 127.5 - 1.0


def read_captions(
    images_dir: str | pathlib.Path,
    captions_file: str | pathlib.Path,
    *,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    kind: str = "image",
) -> list[tuple[pathlib.Path, str]]:
    """``(image path, caption)`` pairs from a ``.tsv`` (``file<TAB>caption`` per line) or a
    ``.jsonl`` (``{"file": ..., "caption": ...}`` per line); files are relative to
    ``images_dir``. Missing images, duplicates and empty captions files are errors.
    ``extensions`` / ``kind``: the accepted files and their name in messages (``"video"``
    with ``data.video.VIDEO_EXTENSIONS`` for videos)."""
    images_dir, captions_file = pathlib.Path(images_dir), pathlib.Path(captions_file)
    article = "an" if kind[:1] in "aeiou" else "a"
    if not images_dir.is_dir():
        raise ValueError(f"--{kind}s {images_dir} is not a directory")
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
                raise ValueError(f'{captions_file}:{n}: expected {{"file": ..., "caption": ...}}') from e
        else:
            if "\t" not in line:
                raise ValueError(f"{captions_file}:{n}: expected 'file<TAB>caption'")
            name, caption = line.split("\t", 1)
        path = images_dir / name
        if path.suffix.lower() not in extensions:
            raise ValueError(f"{captions_file}:{n}: {name} is not {article} {kind} file ({', '.join(extensions)})")
        if not path.exists():
            raise ValueError(f"{captions_file}:{n}: {kind} {path} does not exist")
        pairs.append((path, str(caption).strip()))
    if not pairs:
        raise ValueError(f"{captions_file} lists no {kind}s")
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
            raise ValueError(
                f"{out} holds shards precomputed with other settings ({', '.join(diff)}); "
                "use another --out or pass --overwrite"
            )
    elif out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty and holds no {SETTINGS_FILE}; use another --out or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps(settings, indent=1, sort_keys=True) + "\n")


def _write_resumable(
    out: pathlib.Path, n_items: int, records_per_shard: int, records_for, log, noun: str
) -> list[pathlib.Path]:
    """Shards of ``records_for(lo, hi)`` (the records of items ``lo .. hi - 1``), skipping
    complete ones, then the index; returns the shard paths."""
    n_shards = math.ceil(n_items / records_per_shard)
    shards, fields = [], None
    t0, done = time.time(), 0
    for i in range(n_shards):
        lo, hi = i * records_per_shard, min((i + 1) * records_per_shard, n_items)
        path = out / shard_name(i, n_shards)
        if path.exists() and count_records(path) == hi - lo:
            shards.append(path)
            done += hi - lo
            log(f"shard {i + 1}/{n_shards} already complete: skipped")
            continue
        path, _, spec = write_one_shard(out, i, n_shards, records_for(lo, hi))
        fields = fields or spec
        shards.append(path)
        done += hi - lo
        rate = done / max(time.time() - t0, 1e-9)
        log(f"shard {i + 1}/{n_shards} written: {done}/{n_items} {noun}, {rate:.1f} {noun}/s")
    if fields is None:  # every shard was complete already: read the spec from the first
        from starflow_jax.data.array_record import ArrayRecordSource

        first = ArrayRecordSource(shards[0])[0]
        fields = {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in first.items()}
    write_index(out, shards, fields)
    return shards


def precompute(
    pairs: Sequence[tuple[pathlib.Path, str]],
    out_dir: str | pathlib.Path,
    *,
    encode_images: Callable[[np.ndarray], np.ndarray],
    encode_texts: Callable[[list[str]], np.ndarray],
    image_size,
    channels: int = 3,
    batch_size: int = 8,
    records_per_shard: int = 1024,
    templates: dict | None = None,
    settings: dict | None = None,
    overwrite: bool = False,
    keep_pixels: bool = False,
    log=print,
) -> list[pathlib.Path]:
    """Encode ``pairs`` batch by batch (``encode_images``: ``(b, c, h, w)`` in [-1, 1] to
    latents; ``encode_texts``: captions to ``(b, txt_size, d)`` embeddings) into shards of
    records ``{latent, text_emb, caption, size}`` under ``out_dir``; returns the shards.
    ``image_size``: a side or ``(h, w)`` (an aspect-ratio bucket, ``data.buckets``);
    ``templates``: ``prepare_prompts`` keywords the captions go through first (``fps=0``:
    the reference's ``"An image:"`` template of fps-conditioned models, ``aspect_ratio``,
    ``noise_std``). ``keep_pixels``: each record also holds the encoded image, ``pixels``
    (uint8 ``(c, h, w)``; what ``finetune-decoder``'s ``finetune.shards`` trains on)."""
    from starflow_jax.text.prompts import prepare_prompts

    if batch_size < 1 or records_per_shard < 1:
        raise ValueError("batch_size and records_per_shard must be >= 1")
    out = pathlib.Path(out_dir)
    size = (image_size, image_size) if np.ndim(image_size) == 0 else tuple(int(v) for v in image_size)
    templates = dict(templates or {})
    _check_settings(
        out,
        dict(
            settings or {},
            image_size=image_size if np.ndim(image_size) == 0 else list(size),
            channels=channels,
            num_images=len(pairs),
            records_per_shard=records_per_shard,
            **({"templates": templates} if templates else {}),
            **({"keep_pixels": True} if keep_pixels else {}),  # absent when off: older shard sets resume
        ),
        overwrite,
    )

    def records(lo, hi):
        part = pairs[lo:hi]
        for j in range(0, len(part), batch_size):
            chunk = part[j : j + batch_size]
            images = np.stack([load_image(p, size, channels) for p, _ in chunk])
            latents = np.asarray(encode_images(images), np.float32)
            captions = [c for _, c in chunk]
            texts = np.asarray(
                encode_texts(prepare_prompts(captions, **templates) if templates else captions), np.float32
            )
            if not (np.all(np.isfinite(latents)) and np.all(np.isfinite(texts))):
                raise ValueError(f"encoding {chunk[0][0]} .. {chunk[-1][0]} gave NaN or Inf")
            for (_, caption), image, lat, emb in zip(chunk, images, latents, texts):
                rec = dict(
                    latent=lat,
                    text_emb=emb,
                    caption=caption,
                    size=np.int32(image_size) if np.ndim(image_size) == 0 else np.asarray(size, np.int32),
                )
                if keep_pixels:
                    rec[PIXELS] = pixels_to_uint8(image)
                yield rec

    return _write_resumable(out, len(pairs), records_per_shard, records, log, "images")


# ------------------------------------------------------------------------------ video

EXTEND_PREFIX = "(extend) "  # the reference's caption prefix for clips whose first frame is dropped


def framewise_video_encoder(
    encode_images: Callable[[np.ndarray], np.ndarray], batch_size: int = 8
) -> Callable[[np.ndarray], np.ndarray]:
    """An image encoder (``(b, c, h, w)`` -> ``(b, c', h', w')``, e.g. the SD-VAE) as an
    ``encode_video``: the frames of a ``(t, c, h, w)`` clip ``batch_size`` at a time, so
    ``t' = t``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    def encode_video(frames: np.ndarray) -> np.ndarray:
        return np.concatenate(
            [np.asarray(encode_images(frames[j : j + batch_size])) for j in range(0, len(frames), batch_size)]
        )

    return encode_video


def temporal_video_encoder(encode: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    """A video autoencoder's batched ``encode`` (``(b, t, c, h, w)`` -> ``(b, t', c', h', w')``,
    e.g. a causal Wan VAE with ``t' = 1 + (t - 1) / 4``) as an ``encode_video`` of one clip."""

    def encode_video(frames: np.ndarray) -> np.ndarray:
        return np.asarray(encode(np.asarray(frames)[None]))[0]

    return encode_video


def precompute_videos(
    source,
    out_dir: str | pathlib.Path,
    *,
    encode_video: Callable[[np.ndarray], np.ndarray],
    encode_texts: Callable[[list[str]], np.ndarray],
    fps_cond: bool = False,
    extend: bool = False,
    batch_size: int = 8,
    records_per_shard: int = 256,
    templates: dict | None = None,
    settings: dict | None = None,
    overwrite: bool = False,
    keep_pixels: bool = False,
    log=print,
) -> list[pathlib.Path]:
    """One clip per video of ``source`` (records ``{"video": (t, c, h, w) in [-1, 1],
    "caption", "fps"}``, e.g. ``data.video.VideoFolderSource``) into shards of records

    * ``latent``: ``encode_video(video)``, ``(t', c', h', w')`` (the same for every clip);
    * ``text_emb``: ``encode_texts`` of the caption, put first through the reference's fps
      template (``"A video with {fps} fps:\n{caption}\n"``) when ``fps_cond``;
    * ``text_emb_extend`` (with ``extend``): the same for ``"(extend) " + caption``, the
      conditioning of clips trained without their first latent frame (``train.drop_image``);
    * ``caption``, ``fps`` (float32), ``num_frames`` (the clip's frames, int32) and ``size``
      (its ``(h, w)``, int32);
    * ``pixels`` (with ``keep_pixels``): the clip itself, uint8 ``(t, c, h, w)`` (what
      ``finetune-decoder``'s ``finetune.shards`` trains on).

    ``encode_texts`` maps prompts to ``(b, txt_size, d)`` embeddings without templates of
    its own; captions are encoded ``batch_size`` videos at a time. ``templates``: further
    ``prepare_prompts`` keywords (``aspect_ratio`` of a bucket, ``noise_std``). Resumable
    like ``precompute``."""
    from starflow_jax.text.prompts import prepare_prompts

    if batch_size < 1 or records_per_shard < 1:
        raise ValueError("batch_size and records_per_shard must be >= 1")
    if len(source) == 0:
        raise ValueError("no videos to precompute")
    out = pathlib.Path(out_dir)
    templates = dict(templates or {})
    _check_settings(
        out,
        dict(
            settings or {},
            fps_cond=bool(fps_cond),
            extend=bool(extend),
            num_videos=len(source),
            records_per_shard=records_per_shard,
            **({"templates": templates} if templates else {}),
            **({"keep_pixels": True} if keep_pixels else {}),  # absent when off: older shard sets resume
        ),
        overwrite,
    )
    shape: list = []  # the first clip's latent shape: every clip must match it

    def embed(captions, fps):
        texts = prepare_prompts(captions, fps=[int(f) for f in fps] if fps_cond else None, **templates)
        return np.asarray(encode_texts(texts), np.float32)

    def records(lo, hi):
        for j in range(lo, hi, batch_size):
            items = [source[k] for k in range(j, min(j + batch_size, hi))]
            captions, fps = [str(r["caption"]) for r in items], [float(r["fps"]) for r in items]
            embs = embed(captions, fps)
            ext = embed([EXTEND_PREFIX + c for c in captions], fps) if extend else [None] * len(items)
            for k, r, emb, emb_x in zip(range(j, hi), items, embs, ext):
                video = np.asarray(r["video"], np.float32)
                lat = np.asarray(encode_video(video), np.float32)
                if lat.ndim != 4:
                    raise ValueError(
                        f"encode_video gave latents of shape {lat.shape} for a clip of shape "
                        f"{video.shape}: expected (t', c', h', w')"
                    )
                if not shape:
                    shape.append(lat.shape)
                if lat.shape != shape[0]:
                    raise ValueError(
                        f"video {k} gave latents of shape {lat.shape}, the first one {shape[0]}: "
                        "every clip must have the same frames and size"
                    )
                if not (
                    np.all(np.isfinite(lat))
                    and np.all(np.isfinite(emb))
                    and (emb_x is None or np.all(np.isfinite(emb_x)))
                ):
                    raise ValueError(f"encoding video {k} ({captions[k - j]!r}) gave NaN or Inf")
                rec = dict(
                    latent=lat,
                    text_emb=emb,
                    caption=captions[k - j],
                    fps=np.float32(fps[k - j]),
                    num_frames=np.int32(video.shape[0]),
                    size=np.asarray(video.shape[-2:], np.int32),
                )
                if extend:
                    rec["text_emb_extend"] = emb_x
                if keep_pixels:
                    rec[PIXELS] = pixels_to_uint8(video)
                yield rec

    return _write_resumable(out, len(source), records_per_shard, records, log, "videos")
