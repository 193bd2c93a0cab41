"""``config.data`` to training and held-out sources.

* ``digits``: the embedded handwritten digits (class labels), fixed train / held-out split.
* ``image_folder``: ``data.root/<class>/<image>`` (class labels), resized and centre-cropped
  to the model's size; the held-out split is ``data.heldout_root`` if given, else a fixed
  random ``data.heldout_fraction`` of the images.
* ``array_record``: precomputed latents (``latent``) and text embeddings (``text_emb``) in
  ArrayRecord shards under ``data.path`` (``data.heldout_path`` optional); the train step
  reads them as ``image`` and ``cond``.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from starflow_jax.data.pipeline import ArraySource


@dataclasses.dataclass
class DataSpec:
    train: object  # random-access source of dicts
    heldout: object | None
    num_classes: int  # > 0: records carry class labels; 0: records carry 'cond' embeddings
    train_images: np.ndarray | None = None  # digits only (for the Gaussian baselines)
    heldout_images: np.ndarray | None = None


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
        from starflow_jax.data.digits import NUM_CLASSES, load_digits_splits

        tr, te = load_digits_splits(int(d.num_train), int(d.split_seed))
        return DataSpec(ArraySource(image=tr.images, label=tr.labels), ArraySource(image=te.images, label=te.labels),
                        NUM_CLASSES, tr.images, te.images)
    if name == "image_folder":
        from starflow_jax.data.image_folder import ImageFolderSource

        if "root" not in d:
            raise ValueError("data.name='image_folder' needs data.root (a folder of class subfolders)")
        src = ImageFolderSource(d.root, int(m.img_size), int(m.in_channels))
        if int(m.txt_size) != 1 or int(m.txt_dim) != src.num_classes + 1:
            raise ValueError(f"{d.root} has {src.num_classes} classes: the model needs txt_size=1 and "
                             f"txt_dim={src.num_classes + 1} (one-hot labels plus the null class), "
                             f"it has txt_size={m.txt_size}, txt_dim={m.txt_dim}")
        if d.get("heldout_root"):
            held = ImageFolderSource(d.heldout_root, int(m.img_size), int(m.in_channels))
            if held.classes != src.classes:
                raise ValueError(f"data.heldout_root classes {held.classes} differ from data.root's {src.classes}")
            return DataSpec(src, held, src.num_classes)
        frac = float(d.get("heldout_fraction", 0.05))
        if not 0 <= frac < 1:
            raise ValueError(f"data.heldout_fraction must lie in [0, 1), got {frac}")
        perm = np.random.default_rng(int(d.get("split_seed", 0))).permutation(len(src))
        n_held = int(round(frac * len(src)))
        held = Subset(src, np.sort(perm[:n_held])) if n_held else None
        return DataSpec(Subset(src, np.sort(perm[n_held:])), held, src.num_classes)
    if name == "array_record":
        from starflow_jax.data.array_record import TRAIN_STEP_KEYS, ArrayRecordSource

        if not d.get("path"):
            raise ValueError("data.name='array_record' needs data.path (a directory of ArrayRecord shards, "
                             "e.g. --set data.path=DIR)")

        def open_(path):
            return ArrayRecordSource(path, fields=list(TRAIN_STEP_KEYS), rename=TRAIN_STEP_KEYS)

        train = open_(d.path)
        rec = train[0]
        want = (int(m.in_channels), int(m.img_size), int(m.img_size))
        if tuple(rec["image"].shape[-3:]) != want:
            raise ValueError(f"latents in {d.path} have shape {rec['image'].shape}, the model expects (..., "
                             f"{', '.join(map(str, want))})")
        if tuple(rec["cond"].shape) != (int(m.txt_size), int(m.txt_dim)):
            raise ValueError(f"text embeddings in {d.path} have shape {rec['cond'].shape}, the model expects "
                             f"({m.txt_size}, {m.txt_dim})")
        return DataSpec(train, open_(d.heldout_path) if d.get("heldout_path") else None, 0)
    raise ValueError(f"data.name={name!r} unknown: choose 'digits', 'image_folder' or 'array_record'")
