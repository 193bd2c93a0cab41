"""``config.data`` to training and held-out sources.

* ``digits``: the embedded handwritten digits (class labels), fixed train / held-out split;
  at the model's size and channels when they are not 8x8x1 (``digits.digits_at``, a latent
  stand-in), with a fixed embedding per class as the caption of a text-conditioned model
  (``model.txt_size > 1``).
* ``moving_digits``: clips of the digits drifting with wrap-around (``data.num_frames``
  frames, class labels), for tiny video models; same split as ``digits``.
* ``image_folder``: ``data.root/<class>/<image>`` (class labels), resized and centre-cropped
  to the model's size; the held-out split is ``data.heldout_root`` if given, else a fixed
  random ``data.heldout_fraction`` of the images.
* ``array_record``: precomputed latents (``latent``) and text embeddings (``text_emb``) in
  ArrayRecord shards under ``data.path`` (``data.heldout_path`` optional); the train step
  reads them as ``image`` and ``cond``. Latents are images ``(c, h, w)`` or video clips
  ``(t, c, h, w)`` (a video model, ``model.temporal_causal > 0``; ``t`` is checked against
  ``data.num_frames`` or, failing that, ``data.vid_size``'s frames through
  ``autoencoder.temporal_downsample_factor``). ``train.drop_image > 0`` also reads
  ``text_emb_extend`` (as ``cond_extend``, see ``pipeline.drop_first_frame``).
  ``data.mix_aspect``: ``data.path`` holds one folder of shards per aspect-ratio bucket
  (``16x9``, ... see ``data.buckets``; latents of any side), each batch from one bucket.
  ``data.secondary_path``: image shards (``(c, h, w)`` latents; bucket folders too with
  ``data.mix_aspect``) that a video model trains on in ``train.secondary_ratio`` of the
  steps (``data.mixture``), as the reference feeds its secondary image data: 4-d batches.
  ``data.heldout_path`` is one folder of shards (one bucket) either way.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from starflow_jax import storage
from starflow_jax.data.array_record import SHARD_SUFFIX, TRAIN_STEP_KEYS, ArrayRecordSource
from starflow_jax.data.buckets import ratio_of_dir
from starflow_jax.data.digits import NUM_CLASSES, class_embeddings, digits_at, load_digits_splits
from starflow_jax.data.image_folder import ImageFolderSource
from starflow_jax.data.moving_digits import MovingDigitsSource, config_classes, config_velocities
from starflow_jax.data.pipeline import ArraySource


@dataclasses.dataclass
class DataSpec:
    train: object  # random-access source of dicts
    heldout: object | None
    num_classes: int  # > 0: records carry class labels; 0: records carry 'cond' embeddings
    train_images: np.ndarray | None = None  # digits only (for the Gaussian baselines)
    heldout_images: np.ndarray | None = None
    train_buckets: dict | None = None  # data.mix_aspect: aspect ratio -> source (train is one of them)
    secondary_buckets: dict | None = None  # data.secondary_path: aspect ratio (or "all") -> image source


class Subset:
    """The records ``indices`` of a source."""

    def __init__(self, source, indices):
        self.source, self.indices = source, np.asarray(indices, np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.source[int(self.indices[i])]


def make_data(config) -> DataSpec:
    d = config.data
    m = config.model
    name = str(d.name)
    if name == "digits":
        tr, te = load_digits_splits(int(d.num_train), int(d.split_seed))
        size, channels = int(m.img_size), int(m.in_channels)
        tr_img, te_img = tr.images, te.images
        if (size, channels) != (8, 1):
            tr_img, te_img = digits_at(tr_img, size, channels), digits_at(te_img, size, channels)
        if int(m.txt_size) > 1:  # a text-conditioned model: each class's fixed embedding as its caption
            table = class_embeddings(NUM_CLASSES, int(m.txt_size), int(m.txt_dim), int(d.split_seed))
            return DataSpec(
                ArraySource(image=tr_img, cond=table[tr.labels]),
                ArraySource(image=te_img, cond=table[te.labels]),
                0,
                tr_img,
                te_img,
            )
        return DataSpec(
            ArraySource(image=tr_img, label=tr.labels),
            ArraySource(image=te_img, label=te.labels),
            NUM_CLASSES,
            tr_img,
            te_img,
        )
    if name == "moving_digits":
        if int(m.get("temporal_causal", 0)) <= 0:
            raise ValueError(
                "data.name='moving_digits' yields clips: the model must be a video model (model.temporal_causal > 0)"
            )
        frames = int(d.num_frames)
        if frames < 2:
            raise ValueError(f"data.name='moving_digits' needs data.num_frames >= 2 (frames per clip), got {frames}")
        classes = config_classes(config)
        if int(m.txt_dim) > 0 and int(m.txt_size) == 1 and int(m.txt_dim) != classes + 1:
            raise ValueError(
                f"moving digits have {classes} labels"
                + (" (digit + 10 x velocity index: data.motion_labels)" if d.get("motion_labels", False) else "")
                + f": the model needs txt_dim={classes + 1} (one-hot labels plus the null class), it has "
                f"txt_dim={m.txt_dim}"
            )
        tr, te = load_digits_splits(int(d.num_train), int(d.split_seed))
        v = config_velocities(config)
        variants = int(d.get("clip_variants", 1))
        motion = bool(d.get("motion_labels", False))
        train = MovingDigitsSource(
            tr.images, tr.labels, frames, seed=int(d.split_seed), velocities=v, variants=variants, motion_labels=motion
        )
        held = MovingDigitsSource(
            te.images, te.labels, frames, seed=int(d.split_seed) + 1, velocities=v, motion_labels=motion
        )
        return DataSpec(train, held, classes, train.clips(), held.clips())
    if name == "image_folder":
        if "root" not in d:
            raise ValueError("data.name='image_folder' needs data.root (a folder of class subfolders)")
        src = ImageFolderSource(d.root, int(m.img_size), int(m.in_channels))
        if int(m.txt_size) != 1 or int(m.txt_dim) != src.num_classes + 1:
            raise ValueError(
                f"{d.root} has {src.num_classes} classes: the model needs txt_size=1 and "
                f"txt_dim={src.num_classes + 1} (one-hot labels plus the null class), "
                f"it has txt_size={m.txt_size}, txt_dim={m.txt_dim}"
            )
        if d.heldout_root:
            held = ImageFolderSource(d.heldout_root, int(m.img_size), int(m.in_channels))
            if held.classes != src.classes:
                raise ValueError(f"data.heldout_root classes {held.classes} differ from data.root's {src.classes}")
            return DataSpec(src, held, src.num_classes)
        frac = float(d.heldout_fraction)
        if not 0 <= frac < 1:
            raise ValueError(f"data.heldout_fraction must lie in [0, 1), got {frac}")
        perm = np.random.default_rng(int(d.split_seed)).permutation(len(src))
        n_held = int(round(frac * len(src)))
        held = Subset(src, np.sort(perm[:n_held])) if n_held else None
        return DataSpec(Subset(src, np.sort(perm[n_held:])), held, src.num_classes)
    if name == "array_record":
        return _array_record_data(config)
    raise ValueError(f"data.name={name!r} unknown: choose 'digits', 'moving_digits', 'image_folder' or 'array_record'")


def latent_frames(config) -> int | None:
    """The latent frames per clip the config asks for: ``data.num_frames``, else the frames of
    ``data.vid_size`` (``"frames:fps"``, the reference's) through the autoencoder's temporal
    factor ``f`` (``1 + (frames - 1) // f``: causal video VAEs keep the first frame); None
    when it says neither."""
    d = config.data
    if d.num_frames:
        return int(d.num_frames)
    if d.vid_size:
        frames = int(str(d.vid_size).split(":")[0])
        f = int(config.autoencoder.get("temporal_downsample_factor", 1) or 1) if "autoencoder" in config else 1
        return 1 + (frames - 1) // f
    return None


def _bucket_dirs(path: str, mix_aspect: bool, what: str) -> dict:
    """``{bucket: directory}``: with ``mix_aspect`` the bucket folders under ``path``, else
    ``{"all": path}``; a layout that does not match the setting is an error."""
    import os

    root = storage.as_path(path)  # a local path or an object-storage prefix (gs://...)
    if not mix_aspect and not root.is_dir():
        return {"all": str(path)}  # a shard file, or a path ArrayRecordSource reports as missing
    if not root.is_dir():
        raise ValueError(f"{what} {root} is not a directory (data.mix_aspect=True wants a folder of buckets)")
    flat = any(root.glob(f"*{SHARD_SUFFIX}"))
    if not mix_aspect:
        if not flat and any(p.is_dir() for p in root.iterdir()):
            raise ValueError(
                f"{what} {root} holds no shards but folders (aspect-ratio buckets?): set "
                "data.mix_aspect=True to train on bucket folders"
            )
        return {"all": str(path)}
    if flat:
        raise ValueError(
            f"{what} {root} holds shards, data.mix_aspect=True wants one folder per aspect-ratio "
            "bucket (precompute --aspect-ratio R --out DIR/WxH)"
        )
    dirs = {ratio_of_dir(p.name): os.fspath(p) for p in sorted(root.iterdir()) if p.is_dir()}
    if not dirs:
        raise ValueError(
            f"{what} {root} has no aspect-ratio bucket folders (precompute --aspect-ratio R --out DIR/WxH)"
        )
    return dirs


def _array_record_data(config) -> DataSpec:
    d, m = config.data, config.model
    if not d.path:
        raise ValueError(
            "data.name='array_record' needs data.path (a directory of ArrayRecord shards, e.g. --set data.path=DIR)"
        )
    drop = float(config.train.drop_image) if "train" in config else 0.0
    if not 0 <= drop <= 1:
        raise ValueError(f"train.drop_image is a probability in [0, 1], got {drop}")
    ratio = float(config.train.get("secondary_ratio", 0.0)) if "train" in config else 0.0
    if bool(ratio > 0) != bool(d.get("secondary_path", "")):
        raise ValueError(
            f"train.secondary_ratio={ratio} and data.secondary_path={d.get('secondary_path', '')!r}: "
            "joint image + video training needs both (set data.secondary_path=DIR of image shards), "
            "training without it neither"
        )
    mix = bool(d.get("mix_aspect", False))
    buckets = {
        b: _checked_source(config, p, extend=drop > 0, square=not mix)
        for b, p in _bucket_dirs(d.path, mix, "data.path").items()
    }
    train = buckets.get("1:1", next(iter(buckets.values())))
    held = None
    if d.heldout_path:
        held = ArrayRecordSource(d.heldout_path, fields=list(TRAIN_STEP_KEYS), rename=dict(TRAIN_STEP_KEYS))
    secondary = None
    if d.get("secondary_path", ""):
        if not int(m.get("temporal_causal", 0) or 0):
            raise ValueError(
                "data.secondary_path adds image batches to a video model's training: the model must "
                "be a video model (model.temporal_causal > 0)"
            )
        secondary = {
            b: _checked_source(config, p, extend=False, square=not mix, images=True)
            for b, p in _bucket_dirs(d.secondary_path, mix, "data.secondary_path").items()
        }
    return DataSpec(train, held, 0, train_buckets=buckets if mix else None, secondary_buckets=secondary)


def _checked_source(config, path: str, *, extend: bool, square: bool, images: bool = False):
    """The ArrayRecordSource of ``path`` after checking its records against the model: latent
    channels (and side, when ``square``), frames, text embedding shape, and ``text_emb_extend``
    when ``extend``; ``images``: the latents must be images (secondary data)."""
    m = config.model
    drop = float(config.train.drop_image) if "train" in config else 0.0
    fields, rename = list(TRAIN_STEP_KEYS), dict(TRAIN_STEP_KEYS)
    if extend:
        stored = ArrayRecordSource(path)[0]
        if "text_emb_extend" not in stored:
            raise ValueError(
                f"train.drop_image={drop} needs text_emb_extend (the '(extend) ' caption embeddings) "
                f"in the records of {path}, which have {sorted(stored)}: precompute them with "
                "--videos ... --drop-image, or set train.drop_image=0"
            )
        fields.append("text_emb_extend")
        rename["text_emb_extend"] = "cond_extend"
    src = ArrayRecordSource(path, fields=fields, rename=rename)
    rec = src[0]
    shape = tuple(rec["image"].shape)
    c, side, p = int(m.in_channels), int(m.img_size), int(m.patch_size)
    want = (c, side, side)
    spatial_ok = (
        shape[-3:] == want
        if square
        else (len(shape) >= 3 and shape[-3] == c and shape[-2] % p == 0 and shape[-1] % p == 0)
    )
    if len(shape) not in (3, 4) or not spatial_ok:
        dims, note = (", ".join(map(str, want)), "") if square else (f"{c}, h, w", f" (h, w multiples of {p})")
        raise ValueError(
            f"latents in {path} have shape {shape}, the model expects images ({dims}) or video clips "
            f"(frames, {dims}){note}"
        )
    frames = latent_frames(config)
    if images:
        if len(shape) != 3:
            raise ValueError(f"latents in {path} have shape {shape}: data.secondary_path must hold images (c, h, w)")
    elif len(shape) == 4:
        if not int(m.get("temporal_causal", 0) or 0):
            raise ValueError(
                f"latents in {path} are video clips {shape} (frames, c, h, w): train them with a "
                "video model (model.temporal_causal > 0)"
            )
        if frames is not None and shape[0] != frames:
            raise ValueError(
                f"latents in {path} have {shape[0]} frames, the config asks for {frames} "
                "(data.num_frames, or data.vid_size through the autoencoder's temporal factor)"
            )
    elif frames is not None:
        raise ValueError(f"latents in {path} are images {shape}, the config asks for clips of {frames} frames")
    if extend:
        if len(shape) != 4 or shape[0] < 2:
            raise ValueError(
                f"train.drop_image={drop} drops the first frame of video latents (frames >= 2), "
                f"the latents in {path} have shape {shape}"
            )
        if tuple(rec["cond_extend"].shape) != tuple(rec["cond"].shape):
            raise ValueError(
                f"text_emb_extend in {path} has shape {rec['cond_extend'].shape}, text_emb {rec['cond'].shape}"
            )
    if tuple(rec["cond"].shape) != (int(m.txt_size), int(m.txt_dim)):
        raise ValueError(
            f"text embeddings in {path} have shape {rec['cond'].shape}, the model expects ({m.txt_size}, {m.txt_dim})"
        )
    return src
