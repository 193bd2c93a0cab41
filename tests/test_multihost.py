"""Two processes on localhost (jax.distributed, CPU collectives) train on a 2-process mesh:
they agree on the loss, and it equals a one-process run of the same global batches."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest

HERE = pathlib.Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(nproc: int) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=str(HERE.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("XLA_FLAGS", None)
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(HERE / "multihost_worker.py"), str(port), str(nproc), str(i)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(nproc)
    ]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        lines = [l for l in stdout.splitlines() if l.startswith("LOSSES ")]
        assert p.returncode == 0 and lines, stderr[-3000:]
        out.append(json.loads(lines[-1][len("LOSSES ") :]))
    return out


@pytest.mark.slow
def test_two_processes_agree_with_one():
    two = _run(2)
    one = _run(1)[0]
    assert [r["count"] for r in two] == [2, 2] and all(r["devices"] == 2 for r in two)
    print(f"\none process: {one['losses']}\ntwo processes: {two[0]['losses']} / {two[1]['losses']}")
    assert two[0]["losses"] == two[1]["losses"]
    for a, b in zip(two[0]["losses"], one["losses"]):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(b))
