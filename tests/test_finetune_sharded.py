"""finetune-decoder sharded like the flow's training: on 4 CPU devices a ``data=4`` and a
``data=2 x fsdp=2`` mesh give the one-device step's parameters (float32 tolerance); the
mesh checks; two processes on localhost (jax.distributed) write the one-process result."""

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
        assert m["state_specs"] == ["P()"], m  # weights and optimizer states replicated


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
