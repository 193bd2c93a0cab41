"""Training metrics: one JSON line per logged step (``metrics.jsonl``) and TensorBoard
event files (``tensorboard/``), written by process 0 only."""
from __future__ import annotations

import json
import pathlib
import struct

import jax


class MetricsWriter:
    def __init__(self, workdir: pathlib.Path, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._jsonl = self._tb = None
        if self.enabled:
            from tensorboardX import SummaryWriter

            self._jsonl = open(workdir / "metrics.jsonl", "a")
            self._tb = SummaryWriter(logdir=str(workdir / "tensorboard"), flush_secs=10)

    def write(self, step: int, row: dict) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)):
                self._tb.add_scalar(f"train/{k}", float(v), global_step=step)

    def write_event(self, step: int, name: str, value: float) -> None:
        """A TensorBoard scalar outside the logged rows (e.g. how long a checkpoint save
        blocked the step loop)."""
        if self.enabled:
            self._tb.add_scalar(f"train/{name}", float(value), global_step=step)

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


def read_scalars(logdir: str | pathlib.Path) -> dict[str, list[tuple[int, float]]]:
    """All scalar summaries in the TensorBoard event files under ``logdir``:
    ``{tag: [(step, value), ...]}`` (TFRecord framing: length, crc, payload, crc)."""
    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(pathlib.Path(logdir).rglob("events.out.tfevents.*")):
        data = path.read_bytes()
        i = 0
        while i + 12 <= len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            ev = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            for v in ev.summary.value:
                out.setdefault(v.tag, []).append((int(ev.step), float(v.simple_value)))
    return out
