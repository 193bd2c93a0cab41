"""Training batches drawn from several sources, each batch from one of them: the
aspect-ratio buckets of ``data.mix_aspect`` and the secondary image data of joint image +
video training (``data.secondary_path``, ``train.secondary_ratio``).

Step ``s`` (0-based) of a run seeded ``seed`` first decides, from a generator seeded by
``(seed, s)``, whether it trains on the secondary data (probability
``train.secondary_ratio``, the reference's per-batch coin), then which bucket of that data
(probability proportional to the bucket's records, so every record is met about equally
often). The ``k``-th batch a bucket gives is batch ``k`` of its own shuffled, repeated
stream (``pipeline.train_dataset``: this process's rows of the global batch). The state is
the step and each bucket's count of batches given: a resumed run draws the same batches,
on any number of processes.
"""

from __future__ import annotations

import collections
import zlib
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np

from starflow_jax.data.pipeline import train_dataset
from starflow_jax.parallel.mesh import check_batch_split

_SECONDARY_STREAM = 0x7365636E  # keeps these draws apart from any other use of (seed, step)
_BUCKET_STREAM = 0x6275636B
PRIMARY, SECONDARY = "primary", "secondary"


def _rng(seed: int, step: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) % 2**63, int(step), stream])


def secondary_decision(seed: int, step: int, ratio: float) -> bool:
    """Whether step ``step`` trains on the secondary data: a uniform draw below ``ratio``."""
    if ratio <= 0:
        return False
    return bool(_rng(seed, step, _SECONDARY_STREAM).random() < ratio)


def bucket_decision(seed: int, step: int, sizes, kind: str = PRIMARY) -> int:
    """The index of the bucket step ``step`` draws from, with probability proportional to
    ``sizes`` (records per bucket); ``kind`` keeps the primary and secondary draws apart."""
    sizes = np.asarray(sizes, np.float64)
    if sizes.ndim != 1 or len(sizes) == 0 or np.any(sizes <= 0):
        raise ValueError(f"bucket sizes must be a non-empty list of positive counts, got {sizes.tolist()}")
    if len(sizes) == 1:
        return 0
    u = _rng(seed, step, _BUCKET_STREAM + (kind == SECONDARY)).random()
    return int(min(np.searchsorted(np.cumsum(sizes) / sizes.sum(), u, side="right"), len(sizes) - 1))


class MixtureBatches:
    """This process's rows of each global batch, drawn as the module says. ``groups``:
    ``{"primary": {bucket: source}, "secondary": {bucket: source}}`` (the secondary one
    optional); ``batch_sizes``: the global batch of each group. ``last`` is ``(group,
    bucket)`` of the batch given last. The next ``prefetch`` batches are read ahead by as
    many threads (the order is known in advance; 0: read on demand)."""

    def __init__(
        self,
        groups: dict,
        batch_sizes: dict,
        *,
        seed: int,
        secondary_ratio: float = 0.0,
        process_index: int | None = None,
        process_count: int | None = None,
        prefetch: int = 4,
    ):
        if PRIMARY not in groups or not groups[PRIMARY]:
            raise ValueError("a mixture needs primary buckets")
        if secondary_ratio > 0 and not groups.get(SECONDARY):
            raise ValueError(f"secondary_ratio={secondary_ratio} needs secondary buckets")
        self.seed, self.secondary_ratio = int(seed), float(secondary_ratio)
        self.buckets = {g: sorted(b) for g, b in groups.items() if b}
        self.sizes = {g: [len(groups[g][b]) for b in self.buckets[g]] for g in self.buckets}
        self._datasets = {}
        for g, names in self.buckets.items():
            for b in names:
                key = f"{g}/{b}"
                bucket_seed = (self.seed * 1000003 + zlib.crc32(key.encode())) % 2**31  # its own shuffle
                self._datasets[key] = train_dataset(
                    groups[g][b],
                    global_batch=int(batch_sizes[g]),
                    seed=bucket_seed,
                    process_index=process_index,
                    process_count=process_count,
                )
        self.step = 0
        self.counts = {k: 0 for k in self._datasets}
        self.last: tuple[str, str] | None = None
        self._prefetch = int(prefetch)
        self._pool = ThreadPoolExecutor(self._prefetch, "mixture-read") if self._prefetch > 0 else None
        self._ahead: collections.deque = collections.deque()  # (group, bucket, future) of the next steps
        self._planned = (self.step, dict(self.counts))  # the step and counts after the last planned batch

    def choose(self, step: int) -> tuple[str, str]:
        """``(group, bucket)`` of global batch ``step``."""
        g = SECONDARY if secondary_decision(self.seed, step, self.secondary_ratio) else PRIMARY
        return g, self.buckets[g][bucket_decision(self.seed, step, self.sizes[g], g)]

    def __iter__(self):
        return self

    def _plan_one(self):
        """Queue the read of the batch after the last planned one."""
        step, counts = self._planned
        g, b = self.choose(step)
        key = f"{g}/{b}"
        self._ahead.append((g, b, self._pool.submit(self._datasets[key].__getitem__, counts[key])))
        counts[key] += 1
        self._planned = (step + 1, counts)

    def __next__(self) -> dict:
        g, b = self.choose(self.step)
        key = f"{g}/{b}"
        if self._pool is None:
            batch = self._datasets[key][self.counts[key]]
        else:
            while len(self._ahead) < self._prefetch:
                self._plan_one()
            g_, b_, future = self._ahead.popleft()
            assert (g_, b_) == (g, b)
            batch = future.result()
        self.counts[key] += 1
        self.step += 1
        self.last = (g, b)
        return batch

    def get_state(self) -> dict:
        return {"step": self.step, "counts": dict(self.counts)}

    def set_state(self, state: dict) -> None:
        if not isinstance(state, dict) or set(state) != {"step", "counts"}:
            raise ValueError(
                f"the checkpoint's data state {state!r} is not a mixture's: it was written by a run "
                "without buckets or secondary data"
            )
        if set(state["counts"]) != set(self.counts):
            raise ValueError(
                f"the checkpoint's data came from buckets {sorted(state['counts'])}, this config "
                f"reads {sorted(self.counts)}"
            )
        self.step = int(state["step"])
        self.counts = {k: int(v) for k, v in state["counts"].items()}
        for _, _, future in self._ahead:  # read ahead from the old position
            future.cancel()
        self._ahead.clear()
        self._planned = (self.step, dict(self.counts))


def uses_mixture(data) -> bool:
    """Whether the data has buckets or secondary data (else the plain grain iterator)."""
    return data.train_buckets is not None or data.secondary_buckets is not None


def train_batches(data, config):
    """The iterator of this process's training batches, with ``get_state`` / ``set_state``:
    a MixtureBatches when the data has buckets or secondary data, else the shuffled grain
    stream of ``data.train``."""
    t = config.train
    if not uses_mixture(data):
        return iter(train_dataset(data.train, global_batch=int(t.batch_size), seed=int(t.seed)).to_iter_dataset())
    groups = {PRIMARY: data.train_buckets or {"all": data.train}}
    if data.secondary_buckets:
        groups[SECONDARY] = data.secondary_buckets
    return MixtureBatches(groups, batch_sizes(config), seed=int(t.seed), secondary_ratio=float(t.secondary_ratio))


def batch_sizes(config) -> dict:
    """The global batch of each group: ``train.batch_size``, and ``train.secondary_batch_size``
    (0: ``train.batch_size``) for the secondary data."""
    t = config.train
    return {PRIMARY: int(t.batch_size), SECONDARY: int(t.secondary_batch_size) or int(t.batch_size)}


def check_secondary_split(config, mesh) -> None:
    """The secondary batch must split over the mesh like the primary one (checked before the
    run touches its workdir)."""
    if config.data.secondary_path:
        check_batch_split(
            batch_sizes(config)[SECONDARY],
            int(config.train.grad_accum),
            mesh,
            "train.secondary_batch_size",
            "train.grad_accum",
        )
    if jax.process_count() > 1:
        for name, b in (
            ("train.batch_size", batch_sizes(config)[PRIMARY]),
            ("train.secondary_batch_size", batch_sizes(config)[SECONDARY]),
        ):
            if b % jax.process_count():
                raise ValueError(f"{name}={b} is not divisible by {jax.process_count()} processes")
