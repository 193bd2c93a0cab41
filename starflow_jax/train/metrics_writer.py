"""Training metrics: one JSON line per logged step (``metrics.jsonl``) and TensorBoard
event files (``tensorboard/``), written by process 0 only.

A workdir on object storage (``gs://...``) cannot be appended to: both are then written
in a local staging directory (``metrics.jsonl`` starting from the workdir's copy) and
uploaded whole, at most every ``sync_s`` seconds and when the writer closes. A run killed
without closing loses at most the last ``sync_s`` seconds of rows there (a resumed run logs
the steps after its checkpoint again)."""

from __future__ import annotations

import json
import pathlib
import shutil
import struct
import time

import jax

from starflow_jax import storage
from starflow_jax.workdir.layout import METRICS, TENSORBOARD


class MetricsWriter:
    def __init__(self, workdir, enabled: bool | None = None, sync_s: float = 10.0):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._jsonl = self._tb = None
        self._remote = self._staging = None
        self._sync_s, self._synced = sync_s, time.time()
        if self.enabled:
            from tensorboardX import SummaryWriter

            local = pathlib.Path(workdir) if storage.is_local(workdir) else None
            if local is None:
                self._remote = storage.as_path(workdir)
                local = self._staging = storage.local_staging_dir("starflow-metrics-")
                if (self._remote / METRICS).exists():
                    storage.download_file(self._remote / METRICS, local / METRICS)
            self._jsonl = open(local / METRICS, "a")
            self._tb = SummaryWriter(logdir=str(local / TENSORBOARD), flush_secs=10)

    def write(self, step: int, row: dict) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)):
                self._tb.add_scalar(f"train/{k}", float(v), global_step=step)
        self._maybe_sync()

    def write_event(self, step: int, name: str, value: float) -> None:
        """A TensorBoard scalar outside the logged rows (e.g. how long a checkpoint save
        blocked the step loop)."""
        if self.enabled:
            self._tb.add_scalar(f"train/{name}", float(value), global_step=step)
            self._maybe_sync()

    def _maybe_sync(self, force: bool = False) -> None:
        """Upload the staged files to an object-storage workdir (every ``sync_s`` seconds)."""
        if self._remote is None or not (force or time.time() - self._synced >= self._sync_s):
            return
        self._tb.flush()
        storage.upload_tree(self._staging, self._remote)
        self._synced = time.time()

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()
            if self._remote is not None:
                self._maybe_sync(force=True)
                shutil.rmtree(self._staging, ignore_errors=True)
                self._remote = None


def read_scalars(logdir: str | pathlib.Path) -> dict[str, list[tuple[int, float]]]:
    """All scalar summaries in the TensorBoard event files under ``logdir``:
    ``{tag: [(step, value), ...]}`` (TFRecord framing: length, crc, payload, crc)."""
    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(pathlib.Path(logdir).rglob("events.out.tfevents.*")):
        data = path.read_bytes()
        i = 0
        while i + 12 <= len(data):
            (n,) = struct.unpack("<Q", data[i : i + 8])
            ev = event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
            i += 12 + n + 4
            for v in ev.summary.value:
                out.setdefault(v.tag, []).append((int(ev.step), float(v.simple_value)))
    return out
