"""`starflow-jax plan`: the training step compiled ahead of time for a small TPU slice with
the TPU compiler (libtpu, the `tpu` extra; CI installs it), per-device memory and whether
it fits; without libtpu, on simulated CPU devices, saying so."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _plan(tmp_path, *extra):
    out = tmp_path / "plan.json"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "starflow_jax.cli.main",
            "plan",
            "--config",
            str(ROOT / "configs" / "tiny_cpu.py"),
            "--topology",
            "v5p:2x2x1",
            "--set",
            "train.batch_size=8",
            "--json",
            str(out),
            *extra,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    return proc, out


@pytest.mark.slow
def test_plan_compiles_for_a_small_tpu_slice(tmp_path):
    proc, out = _plan(tmp_path, "--set", "mesh.data=2", "--set", "mesh.fsdp=2", "--remat", "none,full,offload")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [r["remat"] for r in rows] == ["none", "full", "offload"]
    have_libtpu = importlib.util.find_spec("libtpu") is not None
    # attention "auto": the Pallas splash kernel, compiled by the TPU compiler (in a shard_map)
    assert f"kernel {'splash' if have_libtpu else 'per_head'}" in proc.stdout
    for r in rows:
        assert r["attention_kernel"] == ("splash" if have_libtpu else "per_head")
        assert r["devices"] == 4 and r["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}
        assert r["simulated"] is (not have_libtpu)
        assert r["argument_gib"] > 0 and r["temp_gib"] > 0 and r["total_gib"] > r["argument_gib"]
        if have_libtpu:
            assert r["device_kind"].startswith("TPU") and r["fits"] == "True" and r["hbm_gib"] == 95.0
    # rematerialising every layer keeps fewer activations
    assert rows[1]["temp_gib"] <= rows[0]["temp_gib"]
    assert "SIMULATED" in proc.stdout if not have_libtpu else "SIMULATED" not in proc.stdout


def test_plan_rejects_a_mesh_that_does_not_fit(tmp_path):
    proc, _ = _plan(tmp_path, "--set", "mesh.data=3")
    assert proc.returncode == 2 and "does not fit 4 devices" in proc.stderr


def test_plan_rejects_a_batch_that_does_not_split(tmp_path):
    proc, _ = _plan(
        tmp_path,
        "--set",
        "mesh.data=2",
        "--set",
        "mesh.fsdp=2",
        "--set",
        "train.grad_accum=3",
        "--set",
        "train.batch_size=9",
    )
    assert proc.returncode == 2 and "must split into train.grad_accum 3 micro-batches" in proc.stderr


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed (the tpu extra)")
@pytest.mark.parametrize(
    "name,topology", [("starflow_3b_t2i_256", "v5p:4x4x4"), ("starflow_v_7b_t2v_480p", "v5p:4x4x8")]
)
def test_released_configs_compile_for_their_pods_and_fit(name, topology, tmp_path):
    """The released recipes as `train` would run them (their mesh, batch, remat, bfloat16,
    accumulation), compiled by the TPU compiler for the slice their docstrings name."""
    out = tmp_path / "plan.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "starflow_jax.cli.main",
            "plan",
            "--config",
            str(ROOT / "configs" / f"{name}.py"),
            "--topology",
            topology,
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads(out.read_text())
    assert row["device_kind"].startswith("TPU") and row["dtype"] == "bfloat16" and row["attention_kernel"] == "splash"
    assert row["fits"] == "True" and 0 < row["total_gib"] < row["hbm_gib"] == 95.0, row
    assert row["hlo_tflops_per_device"] > 0 and row["collective_gb_per_device"] > 0 and row["unknown_trip_counts"] == 0
    assert 0 < row["step_s_bound"] and 0 < row["mfu_bound"] <= 1
    assert "roofline BOUND, not a measurement" in proc.stdout
