"""One train step on meshes of 8 simulated CPU devices equals the one-device step, and every
parameter / optimizer leaf carries the sharding its rule names."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
from jax.sharding import PartitionSpec as P

from starflow_jax.parallel.mesh import mesh_shape

HERE = pathlib.Path(__file__).resolve().parent


def test_mesh_shapes():
    assert mesh_shape({"data": -1}, 8) == (8, 1, 1)
    assert mesh_shape({"data": 2, "fsdp": -1, "tensor": 2}, 8) == (2, 2, 2)
    with pytest.raises(ValueError, match="does not fit"):
        mesh_shape((3, 1, 1), 8)
    with pytest.raises(ValueError, match="unknown mesh axes"):
        mesh_shape({"pipeline": 2}, 8)
    with pytest.raises(ValueError, match="at most one"):
        mesh_shape((-1, -1, 1), 8)


def test_rules():
    from types import SimpleNamespace

    from jax.tree_util import DictKey

    from starflow_jax.parallel.rules import param_spec

    mesh = SimpleNamespace(shape={"data": 2, "fsdp": 2, "tensor": 2})

    def path(*names):
        return tuple(DictKey(n) for n in names)

    assert param_spec(path("blocks", "attn_blocks", "attention", "qkv", "kernel"), (3, 64, 192), mesh) == P(
        None, "fsdp", "tensor"
    )
    assert param_spec(path("blocks", "attn_blocks", "mlp", "fc2", "kernel"), (3, 256, 64), mesh) == P(
        None, "tensor", "fsdp"
    )
    assert param_spec(path("blocks", "proj_in", "kernel"), (5, 64), mesh) == P(None, None)  # 5 not divisible
    assert param_spec(path("blocks", "attn_blocks", "attention", "norm", "weight"), (3, 64), mesh) == P(None, None)


@pytest.mark.slow
def test_sharded_train_step_equals_one_device():
    env = dict(os.environ, PYTHONPATH=str(HERE.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, str(HERE / "sharding_worker.py")], capture_output=True, text=True, env=env, timeout=600
    )
    lines = [l for l in proc.stdout.splitlines() if l.startswith("REPORT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    report = json.loads(lines[-1][len("REPORT ") :])
    assert report["devices"] == 8
    for m in report["meshes"]:
        print(m)
        assert m["loss_err"] < 1e-5 and m["grad_norm_err"] < 1e-5, m
        assert m["params_err"] < 1e-5 and m["opt_err"] < 1e-5, m
        assert not m["wrong_shardings"], m
    # pure data parallelism replicates the parameters; fsdp / tensor axes split them
    for m in report["meshes"]:
        assert (m["split_leaves"] > 0) == (m["shape"][1] > 1 or m["shape"][2] > 1), m
