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
    """The specs the declared logical axes give a small model's parameters (the pod-sized
    models' in tests/test_param_axes.py)."""
    from starflow_jax.config import load_config, model_config
    from starflow_jax.parallel.rules import tree_specs
    from starflow_jax.train.program import abstract_train_state, optimizer_for, step_settings

    config = load_config(HERE.parent / "configs" / "tiny_cpu.py")
    _, tx = optimizer_for(config, model_config(config))
    params = abstract_train_state(config, tx, step_settings(config, 0))[1].params
    block = tree_specs(params, {"data": 2, "fsdp": 2, "tensor": 2})["blocks"][0]
    layers = block["attn_blocks"]
    assert layers["attention"]["qkv"]["kernel"].get_value() == P(None, "fsdp", "tensor")  # (1, 64, 192)
    assert layers["mlp"]["fc2"]["kernel"].get_value() == P(None, "tensor", "fsdp")
    assert layers["attention"]["norm"]["weight"].get_value() == P(None, None)
    assert block["proj_in"]["kernel"].get_value() == P("fsdp", None)  # (4, 64): FSDP on the input side


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
