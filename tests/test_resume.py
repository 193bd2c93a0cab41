"""Training interrupted after step k and resumed gives the same losses at steps k+1..n as
an uninterrupted run, bit for bit, data order included."""

import json
import pathlib

import pytest
from fast_run import FAST, TINY

from starflow_jax.config import load_config
from starflow_jax.train.loop import train


def _metrics(workdir):
    return [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_resume_is_exact(tmp_path):
    config = load_config(TINY, FAST)
    full = tmp_path / "full"
    train(config, str(full), log=lambda *a: None)
    part = tmp_path / "part"
    out = train(load_config(TINY, FAST), str(part), log=lambda *a: None, stop_after=3)
    assert out == dict(steps=3, stopped=True, reason="stop_after")
    train(load_config(TINY, FAST), str(part), log=lambda *a: None)
    a, b = _metrics(full), _metrics(part)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # bit for bit, data order included
    assert (part / "samples.png").exists()
