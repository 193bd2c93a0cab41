"""finetune-decoder sharded like the flow's training: on 4 CPU devices a ``data=4`` and a
``data=2 x fsdp=2`` mesh (the large weights and optimizer states split over fsdp) give the
one-device step's parameters (float32 tolerance); the fsdp sharding rule; the mesh checks;
two processes on localhost (jax.distributed) write the one-process result."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="building the test VAE needs torch")
diffusers = pytest.importorskip("diffusers", reason="building the test VAE needs diffusers")

HERE = pathlib.Path(__file__).resolve().parent
SMALL = dict(
    block_out_channels=(32, 64),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=16,
)


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vae") / "tiny"
    diffusers.AutoencoderKL(**SMALL).save_pretrained(path)
    return path


def _env():
    env = dict(os.environ, PYTHONPATH=str(HERE.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("XLA_FLAGS", None)
    return env


@pytest.mark.slow  # ~60 s on a loaded 2-core machine: three meshes compiled
def test_sharded_steps_equal_one_device(vae_dir):
    proc = subprocess.run(
        [sys.executable, str(HERE / "finetune_sharding_worker.py"), str(vae_dir)],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=600,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("REPORT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    report = json.loads(lines[-1][len("REPORT ") :])
    assert report["devices"] == 4
    for m in report["meshes"]:
        print(m)
        assert m["moved"] > 1e-4, m  # the steps changed the decoder
        assert m["decoder_err"] < 1e-5 * max(1.0, m["scale"]), m
        assert m["discriminator_err"] < 1e-5 and m["opt_err"] < 1e-6 and m["metrics_err"] < 1e-4, m
        assert m["opt_discriminator_err"] < 1e-5, m  # (data=4 alone: 1.3e-6)
        s = m["sharded"]
        if m["mesh"].get("fsdp", 1) == 1:
            assert m["state_specs"] == ["P()"], m  # data parallelism alone: everything replicated
            assert s["largest_spec"] == "P()" and s["largest_shard_size"] == s["largest_size"], m
        else:  # ZeRO-3: the large weights, their Adam moments and the frozen encoder split over fsdp
            assert "P()" in m["state_specs"], m  # small arrays (biases, norms, step, key) replicated
            assert "fsdp" in s["largest_spec"] and 2 * s["largest_shard_size"] == s["largest_size"], m
            assert s["decoder"] and s["discriminator"] and s["frozen"], m
            assert s["opt_decoder"] == 2 * s["decoder"] and s["opt_discriminator"] == 2 * s["discriminator"], m


def test_fsdp_shardings_rule():
    import jax
    import jax.numpy as jnp
    from jax.sharding import AbstractMesh

    from starflow_jax.autoencoders.finetune.trainer import fsdp_shardings

    def specs(fsdp, **kw):  # an abstract mesh: this process may have one device
        mesh = AbstractMesh((1, fsdp, 1), ("data", "fsdp", "tensor"))
        return jax.tree.map(lambda s: tuple(s.spec), fsdp_shardings(tree, mesh, **kw))

    tree = {
        "kernel": jnp.zeros((3, 3, 64, 128)),  # 73,728 elements: split along its largest axis (128)
        "tie": jax.ShapeDtypeStruct((256, 256), jnp.float32),  # equal axes: the first
        "small_axis": np.zeros((129, 129, 2)),  # only the last axis divides by 2
        "odd": np.zeros((129, 129, 3)),  # no axis divides by 2: replicated
        "bias": jnp.zeros((128,)),  # below the minimum size: replicated
        "big_bias": np.zeros((2**14,)),  # exactly the minimum size: split
        "count": jnp.zeros((), jnp.int32),
    }
    assert specs(2) == {
        "kernel": (None, None, None, "fsdp"),
        "tie": ("fsdp", None),
        "small_axis": (None, None, "fsdp"),
        "odd": (),
        "bias": (),
        "big_bias": ("fsdp",),
        "count": (),
    }
    assert specs(1) == {k: () for k in tree}  # fsdp=1: everything replicated
    assert specs(4, min_size=2**20) == {k: () for k in tree}  # nothing reaches the minimum
    three = specs(3, min_size=1)
    assert three["kernel"] == ("fsdp", None, None, None) and three["odd"] == ("fsdp", None, None)
    assert three["tie"] == () and three["bias"] == () and three["count"] == ()  # 256, 128 % 3; no axis


def test_mesh_checks():
    import jax

    from starflow_jax.autoencoders.finetune.trainer import check_finetune_mesh
    from starflow_jax.parallel.mesh import make_mesh

    class Fake:  # a mesh's shape alone (this process may have one device)
        def __init__(self, **shape):
            self.shape = {"data": 1, "fsdp": 1, "tensor": 1, **shape}

    check_finetune_mesh(make_mesh((1, 1, 1), jax.devices()[:1]), 3)
    with pytest.raises(ValueError, match="not divisible by the mesh's data x fsdp = 4"):
        check_finetune_mesh(Fake(data=2, fsdp=2), 6)
    with pytest.raises(ValueError, match="set mesh.tensor=1"):
        check_finetune_mesh(Fake(tensor=2), 8)
    with pytest.raises(ValueError, match="not divisible by the 4 processes"):
        check_finetune_mesh(Fake(), 6, 4)


def test_local_rows_cover_the_global_batch():
    from starflow_jax.cli.finetune_decoder import local_rows

    idx = np.arange(10, 18)
    parts = [local_rows(idx, i, 4) for i in range(4)]
    assert all(len(p) == 2 for p in parts) and np.array_equal(np.concatenate(parts), idx)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TWO_PROC_SETS = [
    "finetune.steps=4",
    "finetune.batch_size=4",
    "finetune.image_size=16",
    "finetune.log_every=2",
    "finetune.heldout_images=8",
    "finetune.checkpoint_every=2",
]


def _finetune(vae_dir, workdir, nproc: int, *extra, devices: int = 1) -> list[str]:
    """``finetune-decoder`` in ``nproc`` processes (``devices`` CPU devices each) on localhost; their stdouts."""
    sets = [a for s in TWO_PROC_SETS for a in ("--set", s)]
    cmd = [sys.executable, "-m", "starflow_jax.cli.main", "finetune-decoder", "--vae", str(vae_dir)]
    cmd += ["--config", str(HERE.parent / "configs" / "finetune_decoder_digits.py"), "--workdir", str(workdir)]
    cmd += ["--no-perceptual", *sets, *extra]
    port = _free_port()
    env = dict(_env(), JAX_PLATFORMS="cpu")
    if devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    procs = [
        subprocess.Popen(
            cmd
            + (
                ["--coordinator-address", f"127.0.0.1:{port}", "--num-processes", str(nproc), "--process-id", str(i)]
                if nproc > 1
                else []
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(nproc)
    ]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
        outs.append(out)
    return outs


@pytest.mark.slow  # ~3 min on a 2-core machine (5 when loaded): a one-process run, then two two-process runs
def test_two_processes_write_the_one_process_result(vae_dir, tmp_path):
    from safetensors.numpy import load_file

    one, two = tmp_path / "one", tmp_path / "two"
    _finetune(vae_dir, one, 1)
    outs = _finetune(vae_dir, two, 2, "--stop-at", "2")  # stopped, then resumed by two processes
    assert "stopped after step 2" in outs[0] and "stopped after" not in outs[1]  # process 0 reports
    outs = _finetune(vae_dir, two, 2)
    assert "resumed from step 2" in outs[0]
    name = "diffusion_pytorch_model.safetensors"
    want, got = load_file(one / "vae" / name), load_file(two / "vae" / name)
    assert sorted(want) == sorted(got)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], atol=2e-5, rtol=1e-4, err_msg=k)
    rows = lambda w: [json.loads(line) for line in (w / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert [r["step"] for r in rows(two)] == [r["step"] for r in rows(one)] == [0, 2, 4]
    for a, b in zip(rows(two), rows(one)):
        for k, v in b.items():
            if k != "seconds" and isinstance(v, float):
                assert abs(a[k] - v) <= 1e-4 * max(1.0, abs(v)), (k, a[k], v)


@pytest.mark.slow  # ~2 min on a 2-core machine: three runs on 4 CPU devices
def test_fsdp_run_resumes_on_another_mesh(vae_dir, tmp_path):
    """Stopped on data=2 x fsdp=2 (checkpoint of fsdp-sharded arrays), resumed on fsdp=4:
    the result of one uninterrupted data=4 run."""
    from safetensors.numpy import load_file

    one, two = tmp_path / "one", tmp_path / "two"
    _finetune(vae_dir, one, 1, "--set", "mesh.data=4", devices=4)
    _finetune(vae_dir, two, 1, "--set", "mesh.data=2", "--set", "mesh.fsdp=2", "--stop-at", "2", devices=4)
    (out,) = _finetune(vae_dir, two, 1, "--set", "mesh.data=1", "--set", "mesh.fsdp=4", devices=4)
    assert "resumed from step 2" in out
    name = "diffusion_pytorch_model.safetensors"
    want, got = load_file(one / "vae" / name), load_file(two / "vae" / name)
    assert sorted(want) == sorted(got)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], atol=2e-5, rtol=1e-4, err_msg=k)
