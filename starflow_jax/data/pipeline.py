"""grain input pipelines: shuffled, repeated, batched, sharded per process, with an
iterator whose position is a small state that goes into the checkpoint."""

from __future__ import annotations

import grain
import jax
import numpy as np


class ArraySource:
    """Random access over aligned arrays: record ``i`` is ``{name: array[i]}``."""

    def __init__(self, **arrays: np.ndarray):
        lengths = {k: len(v) for k, v in arrays.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"arrays have different lengths: {lengths}")
        self.arrays = arrays
        self.length = next(iter(lengths.values()))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        return {k: v[i] for k, v in self.arrays.items()}


def train_dataset(
    source, *, global_batch: int, seed: int, process_index: int | None = None, process_count: int | None = None
) -> grain.MapDataset:
    """Shuffled each epoch, repeated forever; this process's rows of every global batch.

    Global batch ``k`` is records ``k*G .. (k+1)*G - 1`` of the shuffled stream whatever the
    number of processes; process ``i`` reads only its contiguous rows ``i*L .. (i+1)*L - 1``
    of it (``L = G / processes``), so a run gives the same batches on 1 or many hosts."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if global_batch % process_count:
        raise ValueError(f"global batch {global_batch} is not divisible by {process_count} processes")
    local = global_batch // process_count
    stream = grain.MapDataset.source(source).shuffle(seed=seed).repeat()
    rows = grain.MapDataset.range(len(stream) // global_batch * local)
    ds = rows.map(lambda j: stream[(j // local) * global_batch + process_index * local + j % local])
    return ds.batch(local, drop_remainder=True)


def eval_batches(source, batch: int):
    """The whole split once, in order, in batches (the last one may be smaller)."""
    return grain.MapDataset.source(source).batch(batch, drop_remainder=False)


_DROP_IMAGE_STREAM = 0x64726F70  # keeps these draws apart from any other use of (seed, step)


def drop_image_decision(seed: int, step: int, prob: float) -> bool:
    """Whether global batch ``step`` (0-based) of a run seeded ``seed`` is trained without its
    first frame (``train.drop_image = prob``, the reference's per-batch coin): a uniform draw
    of a generator seeded by ``(seed, step)`` below ``prob``. Made on the host, the same on
    every process and again when a run resumes at ``step``."""
    if prob <= 0:
        return False
    rng = np.random.default_rng([int(seed) % 2**63, int(step), _DROP_IMAGE_STREAM])
    return bool(rng.random() < prob)


def drop_first_frame(batch: dict, drop: bool) -> dict:
    """A batch of video latents ``image`` ``(b, t, c, h, w)`` with its ``cond_extend`` (the
    ``"(extend) "`` caption embeddings) consumed: when ``drop``, ``image[:, 1:]`` conditioned
    on ``cond_extend`` in place of ``cond`` (the reference's ``drop_image``: the clip
    continues a frame the model is not shown); else unchanged."""
    batch = dict(batch)
    extend = batch.pop("cond_extend", None)
    if drop:
        if extend is None:
            raise ValueError("dropping the first frame needs the records' text_emb_extend (cond_extend)")
        image = np.asarray(batch["image"])
        if image.ndim != 5 or image.shape[1] < 2:
            raise ValueError(f"dropping the first frame needs video latents (b, t >= 2, c, h, w), got {image.shape}")
        batch["image"], batch["cond"] = image[:, 1:], extend
    return batch
